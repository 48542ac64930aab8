"""One DP release of the item co-occurrence (Gram) matrix, then PCA: a yardstick beside DP-SGD.

    .venv/bin/python benchmarks/dp_covariance.py [--epsilons 0 8 3 1] [--seeds 3]

The unit of privacy is a user's whole history, as in fedrec's DP runs. Each user's training
items form an indicator vector scaled to L2 norm 1, so one user changes the released sum
G = sum_u v_u v_u^T by at most 1 in Frobenius norm (the upper triangle, which is what is
released, by at most 1 too), and changes the popularity sum p = sum_u v_u by at most 1. Two
Gaussian releases, p with noise sigma / sqrt(f) and G (all items) with noise sigma / sqrt(1 - f),
compose to exactly one Gaussian mechanism of noise multiplier sigma (Gaussian DP adds in
quadrature), calibrated once to (epsilon, delta = 1e-3) with Opacus' PRV accountant and checked
with Google's dp-accounting (PLD). Everything after is post-processing of those two releases:
the noisy G restricted to the M items of largest noisy p, its top-k eigenvectors E_k, and a
user's scores h_u E_k E_k^T (PureSVD, Cremonesi et al. 2010); items outside the M follow,
ordered by noisy popularity.

In a federation this is one round: every silo sums its users' v_u v_u^T and p, adds its share
of the noise (fedrec's distributed noise, docs/distributed-dp.md) and secure aggregation
releases only the sum, which equals the central release computed here. Nothing here is wired
into fedrec yet: it measures whether the mechanism is worth building.

HR@10 is on the test split (held-out item among 99 sampled negatives), as for every fedrec
figure, for two choices of (M, k): fixed in advance (all items, k = FIXED_RANK), which the
guarantee covers, and chosen on the validation split per noise draw, which reads the users'
held-out items outside the guarantee (an optimistic figure, as tuned DP results usually are).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import warnings

import numpy as np

from fedrec.config import FedrecConfig
from fedrec.privacy.accounting import epsilon_dp_accounting
from fedrec.workload import EvalSet, build_workload

DELTA = 1e-3
POP_SHARE = 0.1  # f: the share of the Gaussian DP budget (1/sigma^2) spent on popularity
SIZES = (400, 600, 800, 1000, 1682)
RANKS = (3, 5, 8, 10, 15, 20, 30)
FIXED_RANK = 10  # the choice made in advance: a round number, not tuned on any release


def calibrate(epsilon: float) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=DELTA,
            sample_rate=1.0,
            steps=1,
            accountant="prv",
            epsilon_tolerance=0.005,
        )
    check = epsilon_dp_accounting([(sigma, 1.0, 1)], delta=DELTA, method="pld")
    assert check <= epsilon * 1.01, (sigma, check)
    return sigma


def history_matrix(ev: EvalSet, num_items: int) -> np.ndarray:
    h = np.zeros((len(ev.users), num_items))
    for r, items in enumerate(ev.exclude):
        h[r, items] = 1.0
    return h


def hr_at_10(scores: np.ndarray, ev: EvalSet) -> float:
    cands = np.concatenate([ev.targets[:, None], ev.negatives], axis=1)
    s = scores[np.arange(len(scores))[:, None], cands]
    rank = (s[:, 1:] > s[:, :1]).sum(1) + 0.5 * (s[:, 1:] == s[:, :1]).sum(1)
    return float((rank < 10).mean())


def pca_scores(
    history: np.ndarray, pop: np.ndarray, top: np.ndarray, vecs: np.ndarray, k: int
) -> np.ndarray:
    """h_u E_k E_k^T on the M released items; the rest below them, by noisy popularity."""
    s = np.broadcast_to(pop * 1e-6 - 1e6, history.shape).copy()
    e = vecs[:, -k:]
    s[:, top] = history[:, top] @ e @ e.T
    return s


def symmetric_noise(m: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n = np.triu(rng.normal(0.0, sigma, (m, m)))
    return n + np.triu(n, 1).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0, 8, 3, 1])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    work = build_workload(dataclasses.replace(FedrecConfig(), eval_full_ranking=False))
    n_items, tr = work.dataset.num_items, work.split.train
    x = np.zeros((work.dataset.num_users, n_items))
    x[tr["user"].to_numpy(), tr["item"].to_numpy()] = 1.0
    v = x / np.sqrt(np.maximum(x.sum(1, keepdims=True), 1.0))  # each user's row: L2 norm 1
    pop, gram = v.sum(0), v.T @ v
    hist = {
        name: history_matrix(ev, n_items)
        for name, ev in (("valid", work.valid), ("test", work.test))
    }
    evs = {"valid": work.valid, "test": work.test}
    print(
        f"{x.shape[0]} users, {n_items} items; popularity alone: test HR@10 "
        f"{hr_at_10(np.broadcast_to(pop, hist['test'].shape), work.test):.4f}"
    )
    for eps in args.epsilons:
        sigma = calibrate(eps) if eps > 0 else 0.0
        fixed, tuned = [], []
        for seed in range(args.seeds if eps > 0 else 1):
            rng = np.random.default_rng(seed)
            p = pop + rng.normal(0.0, sigma / np.sqrt(POP_SHARE), n_items) if sigma else pop
            noisy = gram + symmetric_noise(n_items, sigma / np.sqrt(1 - POP_SHARE), rng)
            order = np.argsort(-p)
            by_size = {}
            for m in SIZES:  # each a restriction of the one noisy release: post-processing
                top = order[:m]
                by_size[m] = (top, np.linalg.eigh(noisy[np.ix_(top, top)])[1])
            fixed.append(
                hr_at_10(pca_scores(hist["test"], p, *by_size[n_items], FIXED_RANK), evs["test"])
            )
            grid = {
                (m, k): hr_at_10(pca_scores(hist["valid"], p, *by_size[m], k), evs["valid"])
                for m, k in itertools.product(SIZES, RANKS)
            }
            m, k = max(grid, key=grid.get)
            tuned.append(hr_at_10(pca_scores(hist["test"], p, *by_size[m], k), evs["test"]))
            print(
                f"epsilon {eps:g} (noise multiplier {sigma:.3f}) draw {seed}: all items, "
                f"k={FIXED_RANK} -> test HR@10 {fixed[-1]:.4f}; tuned on validation M={m} k={k} "
                f"(valid {grid[m, k]:.4f}) -> test HR@10 {tuned[-1]:.4f}",
                flush=True,
            )
        print(
            f"epsilon {eps:g}: mean test HR@10 {np.mean(fixed):.4f} fixed in advance, "
            f"{np.mean(tuned):.4f} tuned on validation",
            flush=True,
        )


if __name__ == "__main__":
    main()
