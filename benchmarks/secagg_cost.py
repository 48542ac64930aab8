"""Per-round cost of secure aggregation (fedrec.secagg) against a plain sum, on the CPU.

    .venv/bin/python benchmarks/secagg_cost.py [--clients 5 10 21] [--drop 0 0.3]
        [--neighbours K] [--repeats 3]

The update is the size of fedrec's three task models for the default config and workload
(ML-100K: 1682 items, dim 64), as they travel (``strategies.records.pack``). For each number of
clients n and dropout fraction, all four stages run in this process with the protocol core; a
fraction of the clients drops after sharing keys (the costly case: the server rebuilds their
pairwise masks). Reported, median of the repeats: CPU seconds per client (all its stages), the
server's seconds, the whole round's total, the plain server-side sum of n float vectors, and
the ratio total / plain. Upload per client is the masked vector plus keys and sealed shares.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict

import numpy as np

from fedrec.client.local import build_task_models
from fedrec.config import load_config
from fedrec.secagg import SecAggClient, SecAggConfig, SecAggServer, plan_round
from fedrec.strategies.records import pack
from fedrec.workload import build_workload


def update_shapes() -> dict[str, tuple[int, ...]]:
    cfg = load_config(None, {})
    work = build_workload(cfg)
    record = pack(build_task_models(cfg, work.spec, cfg.seed))
    return {k: tuple(a.numpy().shape) for k, a in record.items()}


def one_round(cfg: SecAggConfig, inputs: dict, drop: set[int], seed: int) -> dict[str, float]:
    """Times (seconds) of the clients (summed), the server, and upload bytes per client."""
    clock: dict[str, float] = defaultdict(float)
    rng = np.random.default_rng(seed)

    def timed(who: str, fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        clock[who] += time.process_time() - t0
        return out

    server = timed("server", SecAggServer, plan_round(cfg, inputs, "1", random.Random(seed)), cfg)
    clients = {u: SecAggClient() for u in inputs}
    setups = timed("server", server.setup)
    adverts = {u: timed("clients", clients[u].setup, setups[u]) for u in inputs}
    keys = timed("server", server.collect_keys, adverts)
    sealed = {u: timed("clients", clients[u].share_keys, keys[u]) for u in keys}
    inbox = timed("server", server.collect_shares, sealed)
    masked = {
        u: timed("clients", clients[u].masked_input, inbox[u], inputs[u], rng)
        for u in inbox
        if u not in drop
    }
    requests = timed("server", server.collect_masked, masked)
    shares = {u: timed("clients", clients[u].unmask, requests[u]) for u in requests}
    result = timed("server", server.unmask, shares)
    if len(result.survivors) != len(inputs) - len(drop):
        raise RuntimeError("unexpected survivors")
    some = next(iter(masked))
    clock["upload"] = (
        masked[some].vector.size * (4 if cfg.modulus <= 2**32 else 8)
        + sum(len(b) for b in sealed[some].values())
        + 32 * 3
        + sum(len(b) for b in shares[some].values())
    )
    return dict(clock)


def plain_sum(inputs: dict) -> float:
    t0 = time.process_time()
    total = {k: np.zeros_like(v) for k, v in next(iter(inputs.values())).items()}
    for arrays in inputs.values():
        for k, v in arrays.items():
            total[k] += v
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[5, 10, 21])
    ap.add_argument("--drop", type=float, nargs="+", default=[0.0, 0.3])
    ap.add_argument("--neighbours", type=int, default=None, help="SecAgg+ degree; default all")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shapes = update_shapes()
    size = sum(int(np.prod(s)) for s in shapes.values())
    cfg = SecAggConfig(clipping_range=1.0, neighbours=args.neighbours)
    print(f"update: {size:,} parameters in {len(shapes)} arrays (float32 {4 * size / 1e6:.2f} MB)")
    print("  n  drop  client_s  server_s  total_s  plain_s  ratio  upload_MB/client")
    rng = np.random.default_rng(0)
    for n in args.clients:
        inputs = {
            1000 + u: {k: rng.uniform(-0.01, 0.01, s).astype(np.float32) for k, s in shapes.items()}
            for u in range(n)
        }
        for frac in args.drop:
            drop = set(sorted(inputs)[: round(frac * n)])
            runs = [one_round(cfg, inputs, drop, seed) for seed in range(args.repeats)]
            plain = statistics.median(plain_sum(inputs) for _ in range(args.repeats))
            client = statistics.median(r["clients"] for r in runs) / n
            srv = statistics.median(r["server"] for r in runs)
            total = statistics.median(r["clients"] + r["server"] for r in runs)
            print(
                f"{n:3d}  {len(drop):4d}  {client:8.3f}  {srv:8.3f}  {total:7.2f}  "
                f"{plain:7.4f}  {total / plain:5.0f}  {runs[0]['upload'] / 1e6:.2f}"
            )


if __name__ == "__main__":
    main()
