"""Issue 4's figure: fused versus the best single task model on a finished run's test users.

    .venv/bin/python benchmarks/fusion_gain.py RUN_DIR

Refits the fusion on the run's validation users twice, on the task models alone and with the
content prior (an untrained scorer over public item text, fedrec.fusion.prior), and prints for
each the fused and per-method test HR@10 / NDCG@10, the chosen normalisation and weights, and
fused minus the best task model with its 95% paired-bootstrap interval. A run without DP holds
the second of these in its summary.json (the default since the prior was added). For a DP run
both refits read the validation users' held-out items, which no DP mechanism covers: an
analysis of what a fit would gain, not a release (its own fusion used equal weights).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from fedrec.config import load_config
from fedrec.fusion.evaluate import fuse_and_evaluate
from fedrec.fusion.prior import PRIOR, content_prior
from fedrec.models.registry import load_model
from fedrec.workload import build_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    args = parser.parse_args()
    cfg = load_config(f"{args.run_dir}/config.toml")
    work = build_workload(cfg)
    models = {t: load_model(f"{args.run_dir}/models/{t}") for t in cfg.tasks}
    prior = content_prior(replace(cfg, fusion_fit="server"), work)  # also for a DP run
    variants = {"task models only": models}
    if prior is not None:
        variants["with the content prior"] = {**models, PRIOR: prior}
    for name, scorers in variants.items():
        out = fuse_and_evaluate(
            scorers, work, method="weighted", seed=cfg.seed, tasks=list(models),
            private=cfg.privacy.mode != "none",
        )  # fmt: skip
        f, vs = out["fusion"], out["fusion"]["vs_best_single"]
        print(f"== {name}: weighted fusion, normalisation {f['normalization']}, weights "
              + ", ".join(f"{k} {v:.3f}" for k, v in f["weights"].items()))
        for scorer, m in out["tasks"].items():
            print(f"   {scorer:9} HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}")
        for method, m in out["per_method"].items():
            print(f"   fused/{method:9} HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}")
        for key in ("hr@10", "ndcg@10"):
            print(f"   fused - {vs['task']} {key}: {vs[key]:+.4f} "
                  f"(95% CI {vs[key + '_ci95_low']:+.4f} to {vs[key + '_ci95_high']:+.4f})")


if __name__ == "__main__":
    main()
