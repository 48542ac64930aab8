"""Central DP-SGD on all users (one holder): the ceiling a distributed-noise federation could reach.

    .venv/bin/python benchmarks/central_dp.py [--epsilon 8] [--batch 128] [--epochs 20]
        [--text content] [--lr 0.01] [--unit user | --unit bucket:K]

Every task model trains on all users under DP-SGD (user-level: Poisson sampling at batch/users,
ghost clipping, Gaussian noise), the noise calibrated once over the three tasks together so
that their composed epsilon meets the budget (RDP accountant). ``--epsilon 0`` trains without
DP. Prints test HR@10 per task every few epochs.

``--unit bucket:K`` makes the DP example one of K buckets of a user's training interactions
(each interaction's bucket a hash of user, item and timestamp, so it depends on no other
interaction; the most recent ``max_len`` of a bucket, ordered by time): adding or removing one
interaction changes one example, which is a substitution, not an addition or removal: the noise
is calibrated so that two add/remove steps (RDP's weak triangle inequality, Mironov 2017,
Proposition 11) meet the budget, and the guarantee covers adding or removing an interaction (a
rating), not a user's whole history (changing one may move it to another bucket: two examples).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from fedrec.client.local import build_task_models
from fedrec.config import load_config
from fedrec.data.sequences import build_sequences
from fedrec.privacy.accounting import calibrate_noise
from fedrec.scoring import evaluate_model
from fedrec.training import DPSGDParams, LocalData, sample_rate_for, steps_per_round, train_task
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
    parser.add_argument("--unit", default="user", help="user | bucket:K")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, {"text.mode": args.text, "seed": args.seed})
    work = build_workload(cfg)
    data = work.central_data() if args.unit == "user" else bucket_data(work, args.unit, cfg.max_len)
    tasks = {
        t: dataclasses.replace(c, batch_size=args.batch, local_epochs=1, lr=args.lr or c.lr)
        for t, c in cfg.tasks.items()
    }
    models = build_task_models(cfg, work.spec, cfg.seed, item_text=work.item_text(cfg.text))
    dp: dict[str, DPSGDParams | None] = dict.fromkeys(tasks)
    if args.epsilon > 0 and args.unit != "user":
        sigma = group2_sigma(args.epsilon, cfg.privacy.delta,
                             sample_rate_for(tasks["recall"], data.n_users),
                             args.epochs * sum(steps_per_round(c, data.n_users)
                                               for c in tasks.values()))
        dp = {t: DPSGDParams(sigma, cfg.privacy.clipping_norm) for t in tasks}
        print(f"noise multiplier {sigma:.3f} (interaction-level, group of 2)")
    elif args.epsilon > 0:
        sigmas = calibrate_noise(
            epsilon=args.epsilon, delta=cfg.privacy.delta,
            sample_rate={t: sample_rate_for(c, data.n_users) for t, c in tasks.items()},
            steps_per_round={t: steps_per_round(c, data.n_users) for t, c in tasks.items()},
            rounds=args.epochs, task_shares=dict.fromkeys(tasks, 1.0), accountant="rdp",
        )
        dp = {t: DPSGDParams(s, cfg.privacy.clipping_norm) for t, s in sigmas.items()}
        print("noise multipliers " + " ".join(f"{t} {s:.3f}" for t, s in sigmas.items()))
    print(f"{data.n_users} examples ({args.unit}), batch {args.batch}, {args.epochs} epochs, epsilon {args.epsilon}")
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


def bucket_data(work, unit: str, max_len: int) -> LocalData:
    """One row per (user, bucket) with two or more interactions (see the module docstring)."""
    k = int(unit.removeprefix("bucket:"))
    train = work.split.train
    key = (train["user"].to_numpy(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
           ^ train["item"].to_numpy(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
           ^ train["timestamp"].to_numpy(np.int64).astype(np.uint64))
    key ^= key >> np.uint64(31)
    key *= np.uint64(0xBF58476D1CE4E5B9)
    key ^= key >> np.uint64(29)
    frame = train.assign(user=train["user"].to_numpy(np.int64) * k
                         + (key % np.uint64(k)).astype(np.int64))
    seqs = build_sequences(frame, max_len)
    keep = seqs.mask.sum(axis=1) >= 2
    seqs = type(seqs)(*(getattr(seqs, f)[keep] for f in ("users", "items", "mask", "context")))
    return LocalData(seqs, work.train.feats[seqs.users // k])


def group2_sigma(epsilon: float, delta: float, q: float, steps: int) -> float:
    """The noise multiplier at which ``steps`` Poisson-sampled Gaussian steps at rate ``q``,
    taken twice (an example replaced = removed, then added), stay within (epsilon, delta)."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    orders = np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(11, 257)])

    def curve(sigma: float, at: np.ndarray) -> np.ndarray:
        acc = rdp.RdpAccountant(list(at))
        acc.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(sigma)), steps)
        return np.asarray(acc._rdp)  # noqa: SLF001 (the per-order RDP the weak triangle needs)

    def eps(sigma: float) -> float:
        # D_a(P||R) <= (a - 1/2) / (a - 1) D_2a(P||Q) + D_(2a-1)(Q||R)
        group = ((orders - 0.5) / (orders - 1) * curve(sigma, 2 * orders)
                 + curve(sigma, 2 * orders - 1))
        return float(rdp.compute_epsilon(orders, group, delta)[0])

    lo, hi = 0.3, 50.0
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if eps(mid) <= epsilon else (mid, hi)
    return hi


if __name__ == "__main__":
    main()
