"""What the DP fit of the fusion weights gives a DP run, and costs its clients, per noise level.

    .venv/bin/python benchmarks/dp_fusion.py RUN_DIR [--sigmas 2 4 8 16] [--draws 4000]

The fit is fedrec's (``fusion_fit = "dp"``, fedrec.fusion.dp: the same candidates and
validation sums): one Gaussian release of the validation NDCG@10 sums of G candidates (each task
model alone, and the equal-weight average; z-scores), each user adding a vector in [0, 1]^G (L2
norm at most sqrt(G)), with noise sigma * sqrt(G) per sum; the server keeps the argmax. For
each noise multiplier sigma this prints how often each candidate wins over ``--draws`` noise
draws, the expected test HR@10 of the choice (against equal weights and the non-private
choice), the release's epsilon alone, and what it adds to the run's worst-off client: composed
epsilon of that client's ledger lines with and without the release (Opacus PRV, delta of the
run), i.e. the budget a client's calibration sets aside. Give it a run made without the fit
(e.g. ``fusion_fit = "fixed"``): a run's own fusion lines would be counted twice.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from fedrec.config import load_config
from fedrec.fusion.dp import NORMALIZATION, candidates, validation_sums
from fedrec.fusion.evaluate import sampled_metrics, task_scores
from fedrec.fusion.fusers import WeightedFuser
from fedrec.models.registry import load_model
from fedrec.privacy import read_ledger
from fedrec.privacy.accounting import epsilon_opacus
from fedrec.scoring import sampled_candidates
from fedrec.workload import build_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # Opacus' PRV domain sizing
    cfg = load_config(args.run_dir / "config.toml")
    work = build_workload(cfg)
    models = {t: load_model(args.run_dir / "models" / t) for t in cfg.tasks}
    cands = candidates(list(models))  # the candidates fedrec's DP fit uses (fedrec.fusion.dp)
    sums = validation_sums(models, work, cands)
    test = task_scores(models, work.test, sampled_candidates(work.test))
    test_hr = {
        name: sampled_metrics(WeightedFuser.from_weights(w, NORMALIZATION).fuse(test))["hr@10"]
        for name, w in cands.items()
    }
    names = list(cands)
    g = len(names)
    print(f"{args.run_dir}: {len(work.valid.users)} validation users, G = {g} candidates")
    for n in names:
        print(f"  {n:9} validation NDCG@10 sum {sums[n]:8.2f}   test HR@10 {test_hr[n]:.4f}")
    best = max(names, key=sums.get)
    print(f"non-private choice: {best} (test HR@10 {test_hr[best]:.4f}); equal weights "
          f"{test_hr['average']:.4f}")
    lines = read_ledger(args.run_dir / "privacy_ledger.jsonl")
    delta = cfg.privacy.delta
    history: dict[str, list] = {}
    for e in lines:
        history.setdefault(e["client"], []).append(
            (e["noise_multiplier"], e["sample_rate"], e["steps"])
        )
    worst = max(history, key=lambda c: epsilon_opacus(history[c], delta=delta))
    before = epsilon_opacus(history[worst], delta=delta)
    rng = np.random.default_rng(args.seed)
    vec = np.array([sums[n] for n in names])
    for sigma in args.sigmas:
        noisy = vec + rng.normal(0.0, sigma * np.sqrt(g), (args.draws, g))
        wins = np.bincount(noisy.argmax(axis=1), minlength=g) / args.draws
        expected = float(sum(w * test_hr[n] for w, n in zip(wins, names, strict=True)))
        alone = epsilon_opacus([(sigma, 1.0, 1)], delta=delta)
        after = epsilon_opacus([*history[worst], (sigma, 1.0, 1)], delta=delta)
        share = ", ".join(f"{n} {w:.2f}" for n, w in zip(names, wins, strict=True))
        print(f"sigma {sigma:g}: wins {share}; expected test HR@10 {expected:.4f}; epsilon "
              f"alone {alone:.3f}; {worst}: {before:.3f} -> {after:.3f} (+{after - before:.3f})",
              flush=True)
    print(json.dumps({"run": str(args.run_dir), "sums": sums, "test_hr": test_hr}))


if __name__ == "__main__":
    main()
