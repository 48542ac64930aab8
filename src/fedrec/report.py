"""report.md with PNG plots of the metrics over rounds, from the run's own files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedrec.rundir import RunDir

PLOTTED = ("hr@10", "ndcg@10", "train_loss")
TABLE_KEYS = ("hr@10", "ndcg@10", "full/recall@10", "full/recall@20", "full/ndcg@10", "auc")


def plot_rounds(run: RunDir, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One PNG per metric: each task's validation value over rounds. Returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for metric in PLOTTED:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for task in sorted({r["task"] for r in rows}):
            pts = [
                (r["round"], r[metric])
                for r in rows
                if r["task"] == task and r.get(metric) is not None
            ]
            if pts:
                ax.plot(*zip(*pts, strict=False), marker="o", label=task)
        ax.set_xlabel("round")
        ax.set_ylabel(metric + (" (validation)" if metric != "train_loss" else ""))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:  # e.g. train_loss under record-level DP: clients do not report it
            ax.text(0.5, 0.5, "not reported", ha="center", va="center", transform=ax.transAxes)
        name = f"plot_{metric.replace('@', '_at_').replace('/', '_')}.png"
        fig.tight_layout()
        fig.savefig(run.path / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def _row(label: str, metrics: Mapping[str, float]) -> str:
    cells = [f"{metrics[k]:.4f}" if k in metrics else "" for k in TABLE_KEYS]
    return f"| {label} | " + " | ".join(cells) + " |"


def results_table(summary: Mapping[str, Any]) -> list[str]:
    lines = ["| model | " + " | ".join(TABLE_KEYS) + " |", "|---" * (len(TABLE_KEYS) + 1) + "|"]
    for task, metrics in summary["tasks"].items():
        lines.append(_row(f"federated {task}", metrics))
    if "fused" in summary:
        lines.append(_row("federated fused", summary["fused"]))
    baselines = summary.get("baselines", {})
    if "popularity" in baselines:
        lines.append(_row("popularity", baselines["popularity"]))
    for task, metrics in baselines.get("central", {}).items():
        lines.append(_row(f"central {task}", metrics))
    return lines


def fusion_lines(fusion: Mapping[str, Any]) -> list[str]:
    """The chosen fusion and its difference from the best single model, with the interval."""
    if not fusion:
        return []
    weights = ", ".join(f"{t} {w:.3f}" for t, w in fusion.get("weights", {}).items())
    lines = ["", f"Fusion: {fusion['method']} ({fusion['normalization']} normalisation; "
             f"weights {weights})."]
    vs = fusion.get("vs_best_single")
    if vs:
        cells = [
            f"{k} {vs[k]:+.4f} (95% CI {vs[k + '_ci95_low']:+.4f} to {vs[k + '_ci95_high']:+.4f})"
            for k in ("hr@10", "ndcg@10")
        ]
        lines.append(f"Fused minus best single model ({vs['task']}): " + "; ".join(cells) + ".")
    return lines


def write_report(
    run: RunDir, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
) -> None:
    plots = plot_rounds(run, rows) if rows else []
    t = summary.get("timing", {})
    lines = [
        f"# fedrec run: {summary['dataset']}",
        "",
        f"{summary['clients']} clients ({summary.get('partition', '')}), "
        f"{summary['rounds']} of {summary.get('rounds_planned', summary['rounds'])} rounds, "
        f"strategy {summary.get('strategy', '')}.",
    ]
    if summary.get("stopped_early"):
        lines += ["", f"**Stopped early:** {summary['stopped_early']}"]
    if summary.get("skipped_rounds"):
        lines += ["", "**Skipped on resume:** round(s) "
                  f"{', '.join(map(str, summary['skipped_rounds']))}, begun before the server "
                  "stopped and not sent again (distributed noise); not in the models"]
    lines += [
        "",
        "## Test metrics",
        "",
        "Sampled protocol: the held-out item among 99 items the user never interacted with. "
        "`full/`: ranking the whole catalogue, the user's history excluded.",
        "",
    ]
    lines += results_table(summary)
    lines += fusion_lines(summary.get("fusion", {}))
    if t:
        lines += [
            "",
            "## Time",
            "",
            f"Federation wall time {t['federation_seconds']:.1f} s; framework overhead "
            f"{t['framework_overhead_share']:.0%} (outside local training and evaluation).",
        ]
    if plots:
        lines += ["", "## Validation metrics over rounds", ""]
        lines += [f"![{p}]({p})" for p in plots]
    run.report.write_text("\n".join(lines) + "\n")
