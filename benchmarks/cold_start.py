"""Issue 6's figures: cold items recommended from their text, and what text costs warm items.

    .venv/bin/python benchmarks/cold_start.py [--dataset ml-100k|synthetic] [--cold 0.15]
        [--epochs 16] [--seed 0] [--seeds 3] [--skip-cold]

1. Cold items. A share of the catalogue (``--cold``, drawn among items with interactions) is
   removed from training entirely. The two-tower recall model is trained centrally on the rest
   three ways: item IDs only (plus category), text instead of IDs, text beside IDs. Each user
   who interacted with cold items is scored against all cold items from their warm history;
   Recall@20 of their cold items is averaged over those users. Popularity cannot rank items it
   has never seen (all zero): its expected Recall@20 is that of a random order, printed beside.
2. Warm items. The same recall model with and without text (beside IDs), trained on the
   standard split, test HR@10 / NDCG@10 with 99 sampled negatives, for ``--seeds`` model seeds
   (initialisation and sampling; same data). One seed cannot resolve a 1% difference (the
   standard error of HR@10 over 943 users is about 0.016), so the difference is the mean over
   seeds with a 95% paired bootstrap interval over users (each user's hit averaged over seeds).

Training is centralized (same model, same training function as the federation) to isolate the
effect of the features; the federated runs use them unchanged (``fedrec simulate --text``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from fedrec.baselines import train_central
from fedrec.client.local import build_task_models
from fedrec.config import FedrecConfig, TextConfig
from fedrec.data.registry import load_dataset
from fedrec.data.sequences import build_sequences, context_of
from fedrec.evaluation.protocol import evaluate_scorer_per_user
from fedrec.models.batching import make_user_batch
from fedrec.scoring import model_score_fn
from fedrec.text.features import item_text_features
from fedrec.training import LocalData, train_task
from fedrec.workload import build_workload

K = 20
MODES = {"ids only": "off", "text instead of ids": "instead", "text beside ids": "beside"}


def cold_split(ds, share: float, seed: int):
    """(cold item indices, warm interactions, cold interactions)."""
    rng = np.random.default_rng(seed)
    seen = np.unique(ds.interactions["item"].to_numpy())
    cold = np.sort(rng.choice(seen, size=round(share * seen.size), replace=False))
    is_cold = ds.interactions["item"].isin(cold)
    return cold, ds.interactions[~is_cold], ds.interactions[is_cold]


def cold_recall(model, ds, warm, cold_rows, cold_items, max_len: int) -> float:
    """Mean Recall@K over users with cold interactions, ranking only the cold items."""
    users = np.intersect1d(cold_rows["user"].unique(), warm["user"].unique())
    seqs = build_sequences(warm, max_len, users)
    feats = ds.user_feature_codes()[users]
    ctx = context_of(np.full(users.size, int(warm["timestamp"].max())))
    relevant = cold_rows.groupby("user")["item"].apply(set)
    cand = torch.as_tensor(cold_items).expand(users.size, -1)
    recalls = []
    with torch.no_grad():
        for lo in range(0, users.size, 256):
            sl = slice(lo, lo + 256)
            batch = make_user_batch(seqs.items[sl], seqs.mask[sl], feats[sl], ctx[sl])
            top = torch.topk(model.score(batch, cand[sl]), K, dim=1).indices.numpy()
            for u, row in zip(users[sl], top, strict=True):
                rel = relevant[u]
                recalls.append(len(rel & set(cold_items[row].tolist())) / min(len(rel), K))
    return float(np.mean(recalls))


def random_recall(cold_rows, warm, n_cold: int) -> float:
    """Expected Recall@K of a random order of the cold items (popularity's tie: all zero)."""
    users = np.intersect1d(cold_rows["user"].unique(), warm["user"].unique())
    sizes = cold_rows[cold_rows["user"].isin(users)].groupby("user").size().to_numpy()
    return float(np.mean([s * K / n_cold / min(s, K) for s in sizes]))


def recall_cfg(dataset: str, epochs: int, seed: int, mode: str) -> FedrecConfig:
    task = dataclasses.replace(FedrecConfig().tasks["recall"], local_epochs=1)
    # the partition does not matter to central training, but the workload builds one
    partition = "site" if dataset.startswith("synthetic") else FedrecConfig.partition
    return FedrecConfig(
        dataset=dataset, partition=partition, rounds=epochs, seed=seed, tasks={"recall": task},
        text=TextConfig(mode=mode), eval_full_ranking=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--cold", type=float, default=0.15)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="model seeds for the warm items")
    parser.add_argument("--skip-cold", action="store_true", help="only the warm-item part")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ds = load_dataset(args.dataset, seed=args.seed)
    cold, warm, cold_rows = cold_split(ds, args.cold, args.seed)
    print(f"{ds.name}: {cold.size} cold items of {ds.num_items} ({args.cold:.0%} of those with "
          f"interactions), {len(cold_rows)} cold interactions held out")
    work = build_workload(recall_cfg(args.dataset, args.epochs, args.seed, "off"))
    feats = ds.user_feature_codes()
    train = LocalData(build_sequences(warm, 50, np.arange(ds.num_users)), feats)
    text = item_text_features(TextConfig(mode="beside"), ds, progress=True)
    if not args.skip_cold:
        cold_part(args, ds, work, train, warm, cold_rows, cold, text)
    warm_part(args, work)


def cold_part(args, ds, work, train, warm, cold_rows, cold, text) -> None:
    print(f"{'model':22} cold Recall@{K}   seconds")
    for label, mode in MODES.items():
        cfg = recall_cfg(args.dataset, args.epochs, args.seed, mode)
        model = build_task_models(cfg, work.spec, args.seed, item_text=text)["recall"]
        t0 = time.perf_counter()
        for epoch in range(args.epochs):
            train_task(model, train, cfg.tasks["recall"], seed=args.seed * 7 + epoch)
        model.eval()
        r = cold_recall(model, ds, warm, cold_rows, cold, cfg.max_len)
        print(f"{label:22} {r:>14.4f}   {time.perf_counter() - t0:7.1f}")
    print(f"{'popularity (= random)':22} {random_recall(cold_rows, warm, cold.size):>14.4f}")


def warm_part(args, work) -> None:
    seeds = [args.seed + i for i in range(args.seeds)]
    print(f"\nwarm items, standard split, test split (99 sampled negatives), {args.epochs} epochs,"
          f" seeds {seeds}")
    print(f"{'model':22} {'seed':>4} {'HR@10':>7} {'NDCG@10':>8}")
    hits: dict[str, list[np.ndarray]] = {}
    for mode in ("off", "beside"):
        for seed in seeds:
            # the model seed varies; the data (a synthetic catalogue is drawn from its seed),
            # the split and the negatives stay those of --seed: ``work``'s
            model = train_central(recall_cfg(args.dataset, args.epochs, seed, mode), work)["recall"]
            model.eval()
            ev = work.test
            per_user = evaluate_scorer_per_user(
                model_score_fn(model, ev), targets=ev.targets, users=ev.users,
                negatives=ev.negatives, exclude=ev.exclude, num_items=model.spec.num_items,
                full_ranking=False,
            )
            hits.setdefault(mode, []).append(per_user["hr@10"])
            print(f"{WARM[mode]:22} {seed:>4} {per_user['hr@10'].mean():>7.4f} "
                  f"{per_user['ndcg@10'].mean():>8.4f}")
    ids, text = (np.mean(hits[m], axis=0) for m in ("off", "beside"))  # per user, over seeds
    diff = text - ids
    rng = np.random.default_rng(args.seed)
    boot = diff[rng.integers(0, diff.size, size=(2000, diff.size))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    base = ids.mean()
    print(f"mean over seeds: ids only {base:.4f}, text beside ids {text.mean():.4f}; "
          f"difference {diff.mean():+.4f} ({diff.mean() / base:+.2%}), 95% paired bootstrap "
          f"{low:+.4f} to {high:+.4f} ({low / base:+.2%} to {high / base:+.2%})")


WARM = {"off": "ids only", "beside": "text beside ids"}


if __name__ == "__main__":
    main()
