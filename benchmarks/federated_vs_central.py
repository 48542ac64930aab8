"""Issue 2's figures: the default federation against centralized training and popularity.

    .venv/bin/python benchmarks/federated_vs_central.py [--config FILE.toml] [--out DIR]

Runs `fedrec simulate` on its built-in default (ML-100K, cross-silo by occupation) with the
baselines, then prints per task: federated and centralized HR@10 / NDCG@10 (99 sampled
negatives), the federated share of the centralized HR@10, popularity, and the wall time and
framework-overhead share of the federation. Everything printed comes from the run's summary.json.
"""

from __future__ import annotations

import argparse

from fedrec.config import load_config
from fedrec.simulation import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--out")
    args = parser.parse_args()
    cfg = load_config(args.config, {"out": args.out})
    run, s = simulate(cfg, baselines=True)
    pop, central, t = s["baselines"]["popularity"], s["baselines"]["central"], s["timing"]
    print(f"run: {run.path}  ({s['dataset']}, {s['clients']} clients, {s['rounds']} rounds)")
    print(
        f"{'task':10} {'fed HR@10':>10} {'central':>8} {'fed/central':>12} {'fed NDCG@10':>12} {'central':>8}"
    )
    for task, m in s["tasks"].items():
        c = central[task]
        print(
            f"{task:10} {m['hr@10']:>10.4f} {c['hr@10']:>8.4f} {m['hr@10'] / c['hr@10']:>12.3f} "
            f"{m['ndcg@10']:>12.4f} {c['ndcg@10']:>8.4f}"
        )
    print(f"{'popularity':10} {pop['hr@10']:>10.4f} {'':>8} {'':>12} {pop['ndcg@10']:>12.4f}")
    print(
        f"federation wall time {t['federation_seconds']:.1f} s; framework overhead "
        f"{t['framework_overhead_seconds']:.1f} s ({t['framework_overhead_share']:.1%}); "
        f"central training {t['central_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
