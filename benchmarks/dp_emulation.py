"""Record-level DP federation emulated in one process: quick probes of DP training settings.

    .venv/bin/python benchmarks/dp_emulation.py [--epsilon 8] [--rounds 12] [--text content]
        [--local-epochs recall=1 ranking=1 personal=1] [--set tasks.ranking.lr=0.001 ...]

Each client of the default federation trains its task models under DP-SGD exactly as the
ClientApp does (fedrec.client.local.train_round), with noise calibrated once per client for the
whole run (fedrec.privacy.calibrate_noise, budget split evenly over the tasks, RDP accountant:
slightly more noise than the PRV accountant the real runs use); the server step is FedAvg
weighted by users. No Flower, no ledger: for comparing settings, not for reporting spent budget
(use ``fedrec simulate --epsilon`` and ``fedrec audit`` for that). Prints the largest silo's
noise multipliers and test HR@10 per task every 4 rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import tomllib

import numpy as np
import torch
from emulation import fedavg_round, initial_state

from fedrec.client.local import build_task_models, train_round
from fedrec.client.privacy import CALIBRATION_MARGIN
from fedrec.config import load_config
from fedrec.privacy.accounting import calibrate_noise
from fedrec.scoring import evaluate_model
from fedrec.training import DPSGDParams, LocalData, sample_rate_for, steps_per_round
from fedrec.workload import build_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--text", default="content", help="content | off")
    parser.add_argument("--local-epochs", nargs="*", default=[], metavar="TASK=N")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, values in TOML syntax (tasks.ranking.lr=0.001)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = {k: tomllib.loads(f"v = {v}")["v"] for k, v in (s.split("=", 1) for s in args.set)}
    cfg = load_config(None, {"text.mode": args.text, "rounds": args.rounds, **overrides})
    epochs = dict(item.split("=") for item in args.local_epochs)
    tasks = {
        t: dataclasses.replace(c, local_epochs=int(epochs.get(t, c.local_epochs)))
        for t, c in cfg.tasks.items()
    }
    cfg = dataclasses.replace(cfg, tasks=tasks)
    work = build_workload(cfg)
    models = build_task_models(cfg, work.spec, cfg.seed, item_text=work.item_text(cfg.text))
    clients = [work.client_data(c) for c in range(work.partition.n_clients)]
    dps = []
    for data in clients:
        sigmas = calibrate_noise(
            epsilon=args.epsilon * CALIBRATION_MARGIN, delta=cfg.privacy.delta,
            sample_rate={t: sample_rate_for(tasks[t], data.n_users) for t in tasks},
            steps_per_round={t: steps_per_round(tasks[t], data.n_users) for t in tasks},
            rounds=args.rounds, task_shares=dict.fromkeys(tasks, 1.0), accountant="rdp",
        )
        dps.append({t: DPSGDParams(z, cfg.privacy.clipping_norm) for t, z in sigmas.items()})
    sizes = np.array([d.n_users for d in clients], dtype=np.float64)
    big = int(np.argmax(sizes))
    print(f"local epochs {[tasks[t].local_epochs for t in tasks]}; largest silo "
          f"({int(sizes[big])} users) noise multipliers "
          + " / ".join(f"{dps[big][t].noise_multiplier:.2f}" for t in tasks), flush=True)
    state = initial_state(models)
    t0 = time.perf_counter()
    for r in range(1, args.rounds + 1):

        def train(c: int, data: LocalData, r: int = r) -> None:
            train_round(cfg, models, data, server_round=r, client_seed=c, dp=dps[c])

        state = fedavg_round(models, state, clients, train)
        if r % 4 == 0 or r == args.rounds:
            hr = []
            for t, m in models.items():
                hr.append(f"{t} {evaluate_model(m, work.test, full_ranking=False)['hr@10']:.4f}")
            print(f"round {r}: test HR@10 {' '.join(hr)} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
