"""Latency of ``Recommender.recommend`` (recall, three task scorers, fusion, filters), one request
at a time on the CPU, at the real catalogue size and at 100k items, exact recall against IVF.

    .venv/bin/python benchmarks/serve_latency.py RUN_DIR [--requests 500] [-k 10] [--threads 1]

Size 1 is the run itself: its trained models, item table and fuser, with the test users' real
histories as requests. Size 2 synthesises a 100k-item catalogue: an item table (ids, titles,
the run's categories drawn at random, Zipf popularity) and freshly initialised models of the
run's architectures and config, whose two-tower gives the 100k x d item-vector matrix the recall
stage searches; the run's fuser is reused and the requests are random histories with the real
histories' lengths. Weights do not change the work done, so the timing is that of a trained
model of this size (an untrained two-tower's item vectors cluster less than trained ones, so the
IVF recall printed is, if anything, pessimistic). At 100k two recommenders share the models, one
searching exactly and one through an IVF index (``fedrec.fusion.index``), timed request by
request in alternation. Prints per size and search: load (build) seconds, p50 and p99 in
milliseconds; then the IVF top-N's recall@N against the exact top-N at a few probe widths.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from fedrec.client.local import build_task_models
from fedrec.config import load_config
from fedrec.fusion.index import IVFIndex
from fedrec.fusion.pipeline import Catalogue, Recommender, load_fuser
from fedrec.fusion.prior import PRIOR
from fedrec.models.registry import build_model
from fedrec.workload import Workload, build_workload

SYNTH_ITEMS = 100_000
WARMUP = 20


def real_histories(work: Workload) -> list[list[int]]:
    """The test users' histories (train + valid items, oldest first) as item indices."""
    seqs = work.test.history.seqs
    return [row[mask].tolist() for row, mask in zip(seqs.items, seqs.mask, strict=True)]


def synthetic(rec: Recommender, run_dir: str, seed: int) -> Callable[[str], Recommender]:
    """A maker of recommenders (by recall index) over a synthesised ``SYNTH_ITEMS``-item
    catalogue (see the module doc); the models are built once and shared."""
    cfg = load_config(f"{run_dir}/config.toml")
    spec = rec.models["recall"].spec
    rng = np.random.default_rng(seed)
    cats = rng.integers(0, spec.num_categories, SYNTH_ITEMS)
    spec = replace(spec, num_items=SYNTH_ITEMS, item_category=tuple(int(c) for c in cats))
    models = build_task_models(cfg, spec, seed)
    if PRIOR in rec.models:  # the run fuses the content prior too: same width, same work
        prior = rec.models[PRIOR]
        models[PRIOR] = build_model(
            "recall", replace(spec, dim=prior.spec.dim), arch="content", text_dim=prior.table.shape[1]
        )
    table = build_workload(cfg).dataset.items
    names = dict(zip(table["category_index"], table["category"], strict=True))
    items = pd.DataFrame(
        {
            "item_id": [f"syn-{i}" for i in range(SYNTH_ITEMS)],
            "title": [f"synthetic item {i}" for i in range(SYNTH_ITEMS)],
            "category": [names.get(int(c), f"cat-{c}") for c in cats],
        }
    )
    catalogue = Catalogue.from_items(items, rng.zipf(1.5, SYNTH_ITEMS).astype(float))
    fuser = load_fuser(run_dir, list(models))
    return lambda index: Recommender(models, catalogue, fuser, rec.features, recall_index=index)


def timed_build(make: Callable[[str], Recommender], index: str) -> tuple[Recommender, float]:
    """The recommender and the seconds its construction took (item vectors, plus the index)."""
    t0 = time.perf_counter()
    rec = make(index)
    return rec, time.perf_counter() - t0


def latencies(recs: list[Recommender], histories: list[list[int]], n: int, k: int) -> np.ndarray:
    """Milliseconds (len(recs), n) per ``recommend`` call over ``n`` requests, each request sent
    to every recommender in turn, so they share the machine's load (after a warm-up)."""
    for h in histories[:WARMUP]:
        for rec in recs:
            rec.recommend(h, k, timestamp=0)
    out = np.empty((len(recs), n))
    for i in range(n):
        h = histories[i % len(histories)]
        for r, rec in enumerate(recs):
            t0 = time.perf_counter()
            rec.recommend(h, k, timestamp=0)
            out[r, i] = (time.perf_counter() - t0) * 1000.0
    return out


def candidates(rec: Recommender, history: list[int], k: int) -> np.ndarray:
    """The recall stage's top-N for this history, as ``recommend`` computes it (seen excluded)."""
    items = np.asarray(history, np.int64)
    allowed = np.ones(len(rec.catalogue), bool)
    allowed[items] = False
    return rec._recall(rec._user_batch(items, None, 0), allowed, k)


def recall_at_n(exact: Recommender, ivf: Recommender, histories: list[list[int]], k: int) -> float:
    """Mean share of the exact top-N that the IVF index also returns."""
    shares = [
        np.isin(candidates(exact, h, k), candidates(ivf, h, k)).mean() for h in histories
    ]
    return float(np.mean(shares))


def report(label: str, ms: np.ndarray, rec: Recommender, k: int, build: float | None = None) -> None:
    p50, p99 = np.percentile(ms, [50, 99])
    load = "" if build is None else f"  load {build:5.2f} s"
    print(
        f"{len(rec.catalogue):>7,} items  {label:<28}{load}  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
        f"  ({len(ms)} requests, recall top-{rec.recall_size}, k={k}, "
        f"{torch.get_num_threads()} torch threads)"
    )


def report_recall(exact: Recommender, ivf: Recommender, hist: list[list[int]], k: int) -> None:
    """recall@N of the IVF top-N against the exact top-N at the default probe width and wider."""
    index = ivf.index
    if not isinstance(index, IVFIndex):
        raise ValueError("the IVF recommender has no index")
    parts = []
    for nprobe in (index.nprobe, 2 * index.nprobe, 4 * index.nprobe):
        ivf.index = replace(index, nprobe=min(nprobe, index.nlist))
        mark = " (default)" if nprobe == index.nprobe else ""
        parts.append(f"nprobe {nprobe}{mark}: {recall_at_n(exact, ivf, hist, k):.3f}")
    ivf.index = index
    print(f"{len(exact.catalogue):>7,} items  IVF recall@{exact.recall_size} vs exact over "
          f"{len(hist)} requests, {index.nlist} lists: " + "; ".join(parts))


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
    report("real run, exact", latencies([rec], hist, args.requests, args.k)[0], rec, args.k)
    make = synthetic(rec, args.run_dir, args.seed)
    exact, exact_s = timed_build(make, "exact")
    ivf, ivf_s = timed_build(make, "ivf")
    rng = np.random.default_rng(args.seed)
    fake = [rng.integers(0, SYNTH_ITEMS, len(h)).tolist() for h in hist]
    ms = latencies([exact, ivf], fake, args.requests, args.k)
    report("SYNTHESISED, exact", ms[0], exact, args.k, exact_s)
    report("SYNTHESISED, IVF", ms[1], ivf, args.k, ivf_s)
    report_recall(exact, ivf, fake[: args.requests], args.k)


if __name__ == "__main__":
    main()
