"""Latency of ``Recommender.recommend`` (recall, three task scorers, fusion, filters), one request
at a time on the CPU, at the real catalogue size and at 100k items.

    .venv/bin/python benchmarks/serve_latency.py RUN_DIR [--requests 500] [-k 10] [--threads 1]

Size 1 is the run itself: its trained models, item table and fuser, with the test users' real
histories as requests. Size 2 synthesises a 100k-item catalogue: an item table (ids, titles,
the run's categories drawn at random, Zipf popularity) and freshly initialised models of the
run's architectures and config, whose two-tower gives the 100k x d item-vector matrix the recall
stage searches exhaustively; the run's fuser is reused and the requests are random histories
with the real histories' lengths. Weights do not change the work done, so the timing is that of
a trained model of this size. Prints one line per size: p50 and p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from fedrec.client.local import build_task_models
from fedrec.config import load_config
from fedrec.fusion.pipeline import Catalogue, Recommender, load_fuser
from fedrec.workload import Workload, build_workload

SYNTH_ITEMS = 100_000
WARMUP = 20


def real_histories(work: Workload) -> list[list[int]]:
    """The test users' histories (train + valid items, oldest first) as item indices."""
    seqs = work.test.history.seqs
    return [row[mask].tolist() for row, mask in zip(seqs.items, seqs.mask, strict=True)]


def synthetic(rec: Recommender, run_dir: str, seed: int) -> Recommender:
    """A recommender over a synthesised ``SYNTH_ITEMS``-item catalogue (see the module doc)."""
    cfg = load_config(f"{run_dir}/config.toml")
    spec = rec.models["recall"].spec
    rng = np.random.default_rng(seed)
    cats = rng.integers(0, spec.num_categories, SYNTH_ITEMS)
    spec = replace(spec, num_items=SYNTH_ITEMS, item_category=tuple(int(c) for c in cats))
    models = build_task_models(cfg, spec, seed)
    table = build_workload(cfg).dataset.items
    names = dict(zip(table["category_index"], table["category"], strict=True))
    items = pd.DataFrame(
        {
            "item_id": [f"syn-{i}" for i in range(SYNTH_ITEMS)],
            "title": [f"synthetic item {i}" for i in range(SYNTH_ITEMS)],
            "category": [names.get(int(c), f"cat-{c}") for c in cats],
        }
    )
    popularity = rng.zipf(1.5, SYNTH_ITEMS).astype(float)
    return Recommender(
        models,
        Catalogue.from_items(items, popularity),
        load_fuser(run_dir, list(models)),
        rec.features,
    )


def latencies(rec: Recommender, histories: list[list[int]], n: int, k: int) -> np.ndarray:
    """Milliseconds per ``recommend`` call over ``n`` requests (after a warm-up)."""
    for h in histories[:WARMUP]:
        rec.recommend(h, k, timestamp=0)
    out = np.empty(n)
    for i in range(n):
        h = histories[i % len(histories)]
        t0 = time.perf_counter()
        rec.recommend(h, k, timestamp=0)
        out[i] = (time.perf_counter() - t0) * 1000.0
    return out


def report(label: str, ms: np.ndarray, rec: Recommender, k: int) -> None:
    p50, p99 = np.percentile(ms, [50, 99])
    print(
        f"{len(rec.catalogue):>7,} items  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
        f"({len(ms)} requests, recall top-{rec.recall_size}, k={k}, "
        f"{torch.get_num_threads()} torch threads; {label})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1, as fedrec serve uses)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rec = Recommender.from_run_dir(args.run_dir)
    hist = [
        h for h in real_histories(build_workload(load_config(f"{args.run_dir}/config.toml"))) if h
    ]
    report(
        "real run: trained models and item table",
        latencies(rec, hist, args.requests, args.k),
        rec,
        args.k,
    )
    big = synthetic(rec, args.run_dir, args.seed)
    rng = np.random.default_rng(args.seed)
    fake = [rng.integers(0, SYNTH_ITEMS, len(h)).tolist() for h in hist]
    report(
        "SYNTHESISED: item table, untrained models, their 100k item-vector matrix",
        latencies(big, fake, args.requests, args.k),
        big,
        args.k,
    )


if __name__ == "__main__":
    main()
