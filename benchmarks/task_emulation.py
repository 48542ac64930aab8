"""One task model's federation emulated in one process: quick probes of local training settings.

    .venv/bin/python benchmarks/task_emulation.py [--task recall] [--epochs 8] [--batch 16]
        [--rounds 12] [--lr 0.01] [--decay none|cos] [--central] [--seed 0]

The default federation's clients (ML-100K, one per occupation) train one task model exactly as
the ClientApp does (fedrec.training.train_task, Adam reset each round); the server step is
FedAvg weighted by users. No Flower, no other tasks: a probe, not the reported figure (that is
benchmarks/federated_vs_central.py). ``--central`` trains the same model on all users for
rounds x epochs passes instead (the passes of ``fedrec train-central``, one per call, so with
other batch draws). ``--decay cos`` lowers the local
learning rate from lr to lr/10 over the rounds (central: over the same passes). Prints
validation and test HR@10 (99 sampled negatives) after every round (central: every ``epochs``
passes) with the seconds so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
from emulation import fedavg_round, initial_state

from fedrec.client.local import build_task_models
from fedrec.config import TASKS, load_config
from fedrec.scoring import evaluate_model
from fedrec.training import LocalData, train_task
from fedrec.workload import build_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="recall", choices=TASKS)
    parser.add_argument("--epochs", type=int, help="local epochs (default: the config's)")
    parser.add_argument("--batch", type=int, help="batch size (default: the config's)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--lr", type=float, help="learning rate (default: the config's)")
    parser.add_argument("--decay", default="none", choices=["none", "cos"])
    parser.add_argument("--central", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, {"rounds": args.rounds, "seed": args.seed})
    base = cfg.tasks[args.task]
    tc = dataclasses.replace(
        base,
        local_epochs=args.epochs or base.local_epochs,
        batch_size=args.batch or base.batch_size,
        lr=args.lr or base.lr,
    )
    work = build_workload(cfg)
    model = build_task_models(cfg, work.spec, cfg.seed)[args.task]

    def lr_at(r: int) -> float:  # round r of args.rounds, 1-based
        if args.decay == "cos":
            return tc.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (r - 1) / args.rounds)))
        return tc.lr

    def report(label: str) -> None:
        v = evaluate_model(model, work.valid, full_ranking=False)["hr@10"]
        t = evaluate_model(model, work.test, full_ranking=False)["hr@10"]
        print(f"{label}: valid HR@10 {v:.4f} test HR@10 {t:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)  # fmt: skip

    print(f"{args.task}: {'central' if args.central else 'federated'}, {tc.local_epochs} epochs "
          f"of batch {tc.batch_size}, lr {tc.lr:g} ({args.decay} decay), {args.rounds} rounds")  # fmt: skip
    t0 = time.perf_counter()
    if args.central:
        data = work.central_data()
        for e in range(args.rounds * tc.local_epochs):
            one = dataclasses.replace(tc, local_epochs=1, lr=lr_at(e // tc.local_epochs + 1))
            train_task(model, data, one, seed=cfg.seed * 7 + e)
            if (e + 1) % tc.local_epochs == 0:
                report(f"central epoch {e + 1}")
        return
    clients = [work.client_data(c) for c in range(work.partition.n_clients)]
    state = initial_state({args.task: model})
    for r in range(1, args.rounds + 1):

        def train(c: int, data: LocalData, r: int = r) -> None:
            train_task(model, data, dataclasses.replace(tc, lr=lr_at(r)), seed=(c * 7919 + r) * 31)

        state = fedavg_round({args.task: model}, state, clients, train)
        report(f"round {r}")


if __name__ == "__main__":
    main()
