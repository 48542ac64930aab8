"""Central DP-SGD on all users (one holder): the ceiling a distributed-noise federation could reach.

    .venv/bin/python benchmarks/central_dp.py [--epsilon 8] [--batch 128] [--epochs 20]
        [--text content] [--lr 0.01]

Every task model trains on all users under DP-SGD (user-level: Poisson sampling at batch/users,
ghost clipping, Gaussian noise), the noise calibrated once over the three tasks together so
that their composed epsilon meets the budget (RDP accountant). ``--epsilon 0`` trains without
DP. Prints test HR@10 per task every few epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from fedrec.client.local import build_task_models
from fedrec.config import load_config
from fedrec.privacy.accounting import calibrate_noise
from fedrec.scoring import evaluate_model
from fedrec.training import DPSGDParams, sample_rate_for, steps_per_round, train_task
from fedrec.workload import build_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--text", default="content")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, {"text.mode": args.text, "seed": args.seed})
    work = build_workload(cfg)
    data = work.central_data()
    tasks = {
        t: dataclasses.replace(c, batch_size=args.batch, local_epochs=1, lr=args.lr or c.lr)
        for t, c in cfg.tasks.items()
    }
    models = build_task_models(cfg, work.spec, cfg.seed, item_text=work.item_text(cfg.text))
    dp: dict[str, DPSGDParams | None] = dict.fromkeys(tasks)
    if args.epsilon > 0:
        sigmas = calibrate_noise(
            epsilon=args.epsilon, delta=cfg.privacy.delta,
            sample_rate={t: sample_rate_for(c, data.n_users) for t, c in tasks.items()},
            steps_per_round={t: steps_per_round(c, data.n_users) for t, c in tasks.items()},
            rounds=args.epochs, task_shares=dict.fromkeys(tasks, 1.0), accountant="rdp",
        )
        dp = {t: DPSGDParams(s, cfg.privacy.clipping_norm) for t, s in sigmas.items()}
        print("noise multipliers " + " ".join(f"{t} {s:.3f}" for t, s in sigmas.items()))
    print(f"{data.n_users} users, batch {args.batch}, {args.epochs} epochs, epsilon {args.epsilon}")
    t0 = time.perf_counter()
    for e in range(1, args.epochs + 1):
        for t, m in models.items():
            train_task(m, data, tasks[t], seed=cfg.seed * 1000 + e, dp=dp[t])
        if e % args.every == 0 or e == args.epochs:
            hr = " ".join(
                f"{t} {evaluate_model(m, work.test, full_ranking=False)['hr@10']:.4f}"
                for t, m in models.items()
            )
            print(f"epoch {e}: test HR@10 {hr} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
