"""Privacy-utility trade-off of record-level DP on the default federation, and the DP slowdown.

    .venv/bin/python benchmarks/privacy_utility.py [--epsilons 1 3 8] [--rounds N] [--out DIR]
    .venv/bin/python benchmarks/privacy_utility.py --slowdown-only
    .venv/bin/python benchmarks/privacy_utility.py --text beside --no-slowdown  # with item text
    .venv/bin/python benchmarks/privacy_utility.py --text content --no-slowdown \
        --dp-noise distributed --dp-rounds 100  # noise shares summed by secure aggregation

1. Slowdown: one local epoch of each task model on the largest ML-100K silo, plain, DP-SGD as
   fedrec trains (ghost norms, one backward pass: fedrec.clipping) and DP-SGD with Opacus's two
   backward passes, alternated in one process (7 repeats each, one torch thread; medians): DP /
   non-DP, and one pass / two.
2. Utility: the default federation without DP and at each epsilon (delta from the config),
   test HR@10 / NDCG@10 per task, printed as a table and plotted to DIR/privacy_utility.png.
   ``--dp-noise distributed``: the DP runs take one step per round with noise shares summed by
   secure aggregation, FedAdam on the server (docs/distributed-dp.md), for ``--dp-rounds``
   rounds; the run without DP stays the default federation.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

from fedrec.client.local import build_task_models
from fedrec.config import FedrecConfig, load_config
from fedrec.training import DPSGDParams, train_task
from fedrec.workload import build_workload


def slowdown(cfg: FedrecConfig, repeats: int = 7) -> dict[str, float]:
    """One torch thread, as each simulated client uses: on a shared 2-core machine extra threads
    fight each other and swamp the ratio with noise. Three kinds alternate in each repeat:
    plain, DP-SGD as fedrec trains (one backward pass: fedrec.clipping), and DP-SGD with
    Opacus's own two passes (``DPTensorFastGradientClipping.backward``, reproduced in
    ``_opacus_two_pass``), so both ratios come from the same run; a fourth kind draws the noise
    (and the negatives) as partner sites and ``secure_rng`` runs do, from a CSPRNG
    (``fedrec.dp_noise``), where the others use seeded torch generators."""
    import torch

    torch.set_num_threads(1)
    work = build_workload(cfg)
    sizes = [len(work.partition.users_of(c)) for c in range(work.partition.n_clients)]
    data = work.client_data(max(range(len(sizes)), key=sizes.__getitem__))
    ratios = {}
    kinds = ("plain", "dp", "dp-secure", "dp-two-pass")
    for task, model in build_task_models(cfg, work.spec, 0, item_text=work.item_text(cfg.text)).items():
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(repeats):
            for kind in kinds:
                seed = None if kind == "dp-secure" else r
                dp = DPSGDParams(1.0, 1.0, noise_seed=seed) if kind != "plain" else None
                with _two_pass(kind == "dp-two-pass"):
                    t0 = time.perf_counter()
                    train_task(model, data, cfg.tasks[task], seed=r, dp=dp)
                times[kind].append((time.perf_counter() - t0) / cfg.tasks[task].local_epochs)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios[task] = med["dp"] / med["plain"]
        print(
            f"{task:9} epoch on {data.n_users} users: plain {med['plain']:.2f} s, DP {med['dp']:.2f} s "
            f"(slowdown {ratios[task]:.2f}x), with secure noise {med['dp-secure']:.2f} s "
            f"({med['dp-secure'] / med['plain']:.2f}x), DP with Opacus's two passes "
            f"{med['dp-two-pass']:.2f} s "
            f"({med['dp-two-pass'] / med['plain']:.2f}x); one pass / two: "
            f"{med['dp'] / med['dp-two-pass']:.2f}"
        )
    return ratios


@contextlib.contextmanager
def _two_pass(on: bool):
    """Within the block, fedrec's clipper takes Opacus's two backward passes."""
    from fedrec.clipping import BookkeepingClipper

    if not on:
        yield
        return
    one = BookkeepingClipper.clipped_backward
    BookkeepingClipper.clipped_backward = _opacus_two_pass  # type: ignore[method-assign]
    try:
        yield
    finally:
        BookkeepingClipper.clipped_backward = one  # type: ignore[method-assign]


def _opacus_two_pass(self, per_example):
    """Opacus 1.6's ``DPTensorFastGradientClipping.backward`` (the clipper's loss reduction,
    "sum"): a pass for the norms, then one of sum_b c_b loss_b with the hooks off."""
    per_example.sum().backward(retain_graph=True)
    self._kept.clear()
    for p in self.trainable_parameters:
        p.grad = None
    coef = self.get_clipping_coef()
    self.disable_hooks()
    try:
        (coef * per_example).sum().backward()
    finally:
        self.enable_hooks()
    return coef


def utility(
    cfg: FedrecConfig, epsilons: list[float], out: Path, dp: dict | None = None
) -> dict[str, dict]:
    """``dp``: config overrides of the DP runs only."""
    from fedrec.simulation import simulate

    results = {}
    for eps in [None, *epsilons]:
        label = "no DP" if eps is None else f"eps={eps:g}"
        over = {
            "out": str(out / label.replace(" ", "_").replace("=", "")),
            "privacy.mode": "none" if eps is None else "record",
        }
        if eps is not None:
            over.update({"privacy.epsilon": eps, **(dp or {})})
        run_cfg = load_config(None, {**_plain(cfg), **over})
        _, s = simulate(run_cfg, baselines=False)
        results[label] = s["tasks"]
        cells = "  ".join(
            f"{t} HR@10 {m['hr@10']:.4f} NDCG@10 {m['ndcg@10']:.4f}" for t, m in s["tasks"].items()
        )
        spent = f" (max epsilon spent {s['privacy']['max_epsilon']:.3f})" if eps is not None else ""
        print(f"{label:8}{spent}: {cells}", flush=True)
    _plot(results, out / "privacy_utility.png")
    return results


def _plain(cfg: FedrecConfig) -> dict:
    data = cfg.to_dict()
    data.pop("out")
    return data


def _plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task in next(iter(results.values())):
        ax.plot(labels, [results[lb][task]["hr@10"] for lb in labels], marker="o", label=task)
    ax.set_ylabel("test HR@10")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--out", default="runs/privacy_utility")
    parser.add_argument("--slowdown-only", action="store_true")
    parser.add_argument("--no-slowdown", action="store_true", help="only the utility sweep")
    parser.add_argument("--text", choices=["off", "beside", "instead", "content"], help="item text features")
    parser.add_argument("--dp-noise", choices=["local", "distributed"], default="local")
    parser.add_argument("--dp-rounds", type=int, help="rounds of the DP runs (default: --rounds)")
    args = parser.parse_args()
    cfg = load_config(None, {"rounds": args.rounds, "text.mode": args.text})
    if not args.no_slowdown:
        slowdown(cfg)
    if not args.slowdown_only:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        dp: dict = {} if args.dp_rounds is None else {"rounds": args.dp_rounds}
        if args.dp_noise == "distributed":
            dp.update({"privacy.noise": "distributed", "secure_aggregation": True,
                       "strategy": "fedadam"})  # fmt: skip
        utility(cfg, args.epsilons, out, dp)


if __name__ == "__main__":
    main()
