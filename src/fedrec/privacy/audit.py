"""Audit a privacy ledger: verify the chain and recompute every reported epsilon independently.

For each client the audit rebuilds the per-task histories from the ledger alone and recomputes
epsilon with four accountants: Opacus PRV and RDP, and Google's dp-accounting PLD and RDP. The
ledger's ``accountant`` decides which two must agree with the reported number:

* ``prv``: Opacus PRV (the same computation, reproduced) and dp-accounting PLD (independent).
* ``rdp``: Opacus RDP and dp-accounting RDP (independent; same orders, agree to ~1e-5 relative).

Tolerance (``Tolerance``): ``|reported - recomputed| <= 0.02 + 0.02 * max(both)``. PRV and PLD
both give upper bounds but differ by construction: Opacus PRV returns its estimate plus its
``eps_error`` (0.01) and dp-accounting PLD discretises pessimistically at 1e-4, so PRV sits
0.0092-0.0122 above PLD over sigma 0.6-5, q 0.001-0.1, 10-5000 steps (measured). An absolute
0.01 would sit on that edge; 0.02 does not, and the relative 2 % covers large epsilons, where
discretisation errors grow with the number of compositions.

Budget: a row is over budget when the larger of the reported value and the same-implementation
recomputation exceeds the budget; the client's budget bounds the composed row (all tasks).

Site ledger (``site=True``, a deployed partner's own file holding every run it took part in):
the rows above come per run (``AuditRow.run`` is the run id; their epsilons count that run
only), followed by ``LIFETIME`` rows that compose every line of the file, per task and over all
tasks: the site's lifetime epsilon. No ledger field reports it, so those rows are recomputations
(``epsilon`` is the ledger accountant's, the independent one must agree), held to the latest
line's ``budget_epsilon``, the budget the client enforced on all its runs together. At the end
of each run's stretch of lines the lifetime so far must also be within that line's budget.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedrec.privacy.accounting import (
    HistoryItem,
    epsilon_dp_accounting,
    epsilon_opacus,
    history_item,
    smallest_delta,
)
from fedrec.privacy.ledger import ChainReport, verify_chain

COMPOSED = "(all tasks)"
LIFETIME = "lifetime, all runs"
_JITTER = 1e-3  # numerical slack before a cumulative epsilon counts as decreasing
Recompute = Callable[[list[HistoryItem], float], float]
RECOMPUTATIONS: dict[str, Recompute] = {
    "opacus-prv": lambda h, d: epsilon_opacus(h, delta=d, accountant="prv"),
    "opacus-rdp": lambda h, d: epsilon_opacus(h, delta=d, accountant="rdp"),
    "dp-accounting-pld": lambda h, d: epsilon_dp_accounting(h, delta=d, method="pld"),
    "dp-accounting-rdp": lambda h, d: epsilon_dp_accounting(h, delta=d, method="rdp"),
}
MUST_MATCH: dict[str, tuple[str, str]] = {
    "prv": ("opacus-prv", "dp-accounting-pld"),
    "rdp": ("opacus-rdp", "dp-accounting-rdp"),
}


@dataclass(frozen=True)
class Tolerance:
    """Two epsilons agree when ``|a - b| <= abs + rel * max(a, b)`` (see the module doc)."""

    rel: float = 0.02
    abs: float = 0.02

    def agrees(self, a: float, b: float) -> bool:
        return abs(a - b) <= self.abs + self.rel * max(abs(a), abs(b))


@dataclass
class AuditRow:
    """One (client, task) line of the audit; ``task == COMPOSED`` is the client's total.

    ``run``: empty for a run's own ledger; in a site ledger the run id (epsilons of that run
    only) or ``LIFETIME`` (all runs of the file composed)."""

    client: str
    task: str
    accountant: str
    delta: float
    rounds: int
    epsilon: float  # as reported by the ledger (cumulative)
    recomputed: dict[str, float]
    budget: float | None
    status: str  # "ok", "over-budget", "mismatch" or "over-budget+mismatch"
    detail: str = ""
    run: str = ""

    @property
    def label(self) -> str:
        """The client, and in a site ledger which run (or the lifetime) the row covers."""
        if not self.run:
            return self.client
        return f"{self.client} [{self.run if self.run == LIFETIME else 'run ' + self.run}]"


@dataclass
class AuditResult:
    ok: bool
    chain: ChainReport
    rows: list[AuditRow]
    problems: list[str]
    tolerance: Tolerance
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # composed/round

    def to_dict(self) -> dict[str, Any]:
        chain = {k: v for k, v in asdict(self.chain).items() if k != "entries"}
        return {
            "ok": self.ok,
            "chain": chain,
            "problems": self.problems,
            "tolerance": asdict(self.tolerance),
            "rows": [asdict(r) for r in self.rows],
            "series": {c: [list(p) for p in s] for c, s in self.series.items()},
        }


def audit_ledger(
    path: str | os.PathLike[str],
    *,
    budgets: Mapping[str, float] | None = None,
    run_budget: float | None = None,
    tolerance: Tolerance = Tolerance(),
    run_id: str | None = None,
    expected_head: str | None = None,
    every_entry: bool = True,
    site: bool = False,
) -> AuditResult:
    """Verify the chain, recompute each client's epsilons and check them against budgets.

    ``budgets`` maps client to its epsilon budget; clients missing from it are held to
    ``run_budget`` if given (a run's ``privacy.epsilon``), else to the ``budget_epsilon`` their
    latest entry states. With ``every_entry`` each entry's cumulative
    epsilons are recomputed with the ledger's accountant: two Opacus calls per entry, about
    0.5 s per entry for PRV with three tasks (300 entries: about 2.5 minutes). Without it only
    the cheap checks (monotone, consistent) run per entry. The final epsilons always get all
    four accountants. ``site``: ``path`` is a site ledger (see the module doc; no ``run_id``).
    """
    chain = verify_chain(path, run_id=run_id, expected_head=expected_head, site=site)
    problems = [f"chain: {p}" for p in chain.problems]
    if run_budget is not None:
        budgets = {**{str(e["client"]): run_budget for e in chain.entries}, **(budgets or {})}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in chain.entries:
        groups.setdefault((entry["run_id"] if site else "", entry["client"]), []).append(entry)
    runs = list(dict.fromkeys(run for run, _ in groups))  # in the order of the file
    rows: list[AuditRow] = []
    series: dict[str, list[tuple[int, float]]] = {}
    for (run, client), entries in sorted(groups.items(), key=lambda g: (runs.index(g[0][0]), g[0])):
        new = _final_rows(client, entries, budgets, tolerance, run=run)
        problems += _consistency_problems(new[0].label, entries)
        problems += _entry_problems(entries, tolerance, recompute=every_entry)
        rows += new
        per_round = {e["round"]: e["epsilon_composed"] for e in entries}
        series[new[0].label] = sorted(per_round.items())
    if site and chain.entries:
        client = "+".join(sorted({e["client"] for e in chain.entries}))
        rows += _final_rows(client, chain.entries, budgets, tolerance, run=LIFETIME)
        problems += _lifetime_problems(chain.entries)
    ok = chain.ok and not problems and all(r.status == "ok" for r in rows)
    return AuditResult(ok, chain, rows, problems, tolerance, series)


def _lifetime_problems(entries: list[dict[str, Any]]) -> list[str]:
    """At the end of each run's stretch of a site ledger, all lines so far (every run) composed
    at the smallest delta among them must be within that line's ``budget_epsilon``: the client
    checked this before the round (``fedrec.client.privacy.lifetime_delta``)."""
    problems = []
    for i, e in enumerate(entries):
        if i + 1 < len(entries) and entries[i + 1]["run_id"] == e["run_id"]:
            continue
        hist = [history_item(x) for x in entries[: i + 1]]
        delta = smallest_delta(entries[: i + 1])
        eps = epsilon_opacus(hist, delta=delta, accountant=e["accountant"])
        if eps > e["budget_epsilon"] * (1 + 1e-12):
            problems.append(
                f"seq {e['seq']} (run {e['run_id']!r}): lifetime epsilon {eps:.4f} of all runs "
                f"so far (at delta {delta:g}) exceeds the budget {e['budget_epsilon']:g} this "
                "line states"
            )
    return problems


def _consistency_problems(client: str, entries: list[dict[str, Any]]) -> list[str]:
    problems = []
    for name in ("accountant", "delta", "budget_epsilon", "unit"):
        values = sorted({e[name] for e in entries}, key=str)
        if len(values) > 1:
            problems.append(f"client {client!r}: {name} changes between entries: {values}")
    return problems


def _entry_problems(entries: list[dict[str, Any]], tol: Tolerance, *, recompute: bool) -> list[str]:
    problems: list[str] = []
    per_task: dict[str, list[HistoryItem]] = {}
    composed: list[HistoryItem] = []
    last: dict[str, float] = {}
    for e in entries:
        where = f"seq {e['seq']} (client {e['client']!r}, task {e['task']!r}, round {e['round']})"
        item = history_item(e)
        per_task.setdefault(e["task"], []).append(item)
        composed.append(item)
        for key, prev_key in (("epsilon", e["task"]), ("epsilon_composed", COMPOSED)):
            if e[key] < last.get(prev_key, 0.0) - _JITTER:
                problems.append(f"{where}: {key} {e[key]:.4f} decreased (was {last[prev_key]:.4f})")
            last[prev_key] = e[key]
        if not recompute:
            continue
        acct = e["accountant"]
        for key, hist in (("epsilon", per_task[e["task"]]), ("epsilon_composed", composed)):
            value = epsilon_opacus(hist, delta=e["delta"], accountant=acct)
            if not tol.agrees(e[key], value):
                problems.append(
                    f"{where}: {key} {e[key]:.4f} but opacus-{acct} recomputes {value:.4f}"
                )
    return problems


def _final_rows(
    client: str,
    entries: list[dict[str, Any]],
    budgets: Mapping[str, float] | None,
    tol: Tolerance,
    *,
    run: str = "",
) -> list[AuditRow]:
    """One row per task and one composed; ``run == LIFETIME``: recomputed, not reported."""
    latest = entries[-1]
    acct, delta = latest["accountant"], latest["delta"]
    if run == LIFETIME:  # at the smallest delta of the site's runs, as the client checks it
        delta = smallest_delta(entries)
    budget = float(latest["budget_epsilon"])
    notes = _lifetime_notes(entries, acct, delta) if run == LIFETIME else []
    if budgets is not None and client in budgets:
        if not math.isclose(budgets[client], budget):
            notes.append(f"ledger states budget {budget:g}; audited against {budgets[client]:g}")
        budget = float(budgets[client])
    rows = []
    groups = {
        t: [e for e in entries if e["task"] == t] for t in sorted({e["task"] for e in entries})
    }
    for task, task_entries in [*groups.items(), (COMPOSED, entries)]:
        hist = [history_item(e) for e in task_entries]
        rec = {name: fn(hist, delta) for name, fn in RECOMPUTATIONS.items()}
        reported = (
            rec[MUST_MATCH[acct][0]]
            if run == LIFETIME
            else task_entries[-1]["epsilon" if task != COMPOSED else "epsilon_composed"]
        )
        rounds = len({(e["run_id"], e["round"]) for e in task_entries})
        row = AuditRow(
            client, task, acct, delta, rounds, reported, rec, budget, "ok", "; ".join(notes), run
        )
        rows.append(_judge(row, tol))
    return rows


def _lifetime_notes(entries: list[dict[str, Any]], acct: str, delta: float) -> list[str]:
    notes = [f"recomputed over {len({e['run_id'] for e in entries})} run(s)"]
    if len({e["delta"] for e in entries}) > 1:
        notes.append(f"runs differ in delta: stated at the smallest ({delta:g})")
    if len({e["accountant"] for e in entries}) > 1:
        notes.append(f"runs differ in accountant: stated with the latest ({acct})")
    return notes


def _judge(row: AuditRow, tol: Tolerance) -> AuditRow:
    primary, independent = MUST_MATCH[row.accountant]
    details = [row.detail] if row.detail else []
    flags = []
    worst = max(row.epsilon, row.recomputed[primary])
    if row.budget is not None and worst > row.budget * (1 + 1e-12):
        flags.append("over-budget")
        details.append(f"epsilon {worst:.4f} > budget {row.budget:g}")
    off = [n for n in (primary, independent) if not tol.agrees(row.epsilon, row.recomputed[n])]
    if off:
        flags.append("mismatch")
        details += [f"{n} recomputes {row.recomputed[n]:.4f} vs {row.epsilon:.4f}" for n in off]
    row.status = "+".join(flags) or "ok"
    row.detail = "; ".join(details)
    return row


TABLE_COLUMNS: tuple[str, ...] = ("client", "task", "epsilon", "budget", "status")


def format_table(result: AuditResult) -> list[tuple[str, str, str, str, str]]:
    """Rows (strings, in ``TABLE_COLUMNS`` order) for a rich table: one per client x task."""
    return [
        (
            r.label,
            r.task,
            f"{r.epsilon:.3f}",
            "-" if r.budget is None else f"{r.budget:g}",
            r.status,
        )
        for r in result.rows
    ]


def write_audit(
    result: AuditResult, out_dir: str | os.PathLike[str], extra: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``audit.json`` (``result`` and any ``extra`` keys) and ``epsilon.png`` (composed
    epsilon over rounds per client)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "audit.json"
    data = result.to_dict()
    if clash := set(data) & set(extra or {}):
        raise ValueError(f"extra keys {sorted(clash)} would replace the audit's own")
    data.update(extra or {})
    json_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    png_path = out / "epsilon.png"
    _plot(result, png_path)
    return json_path, png_path


def _plot(result: AuditResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = {r.label: r.budget for r in result.rows if r.task == COMPOSED}
    fig, ax = plt.subplots(figsize=(7, 4))
    for client, points in result.series.items():
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=client)
        if (budget := budgets.get(client)) is not None:
            ax.axhline(budget, color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon, all tasks")
    ax.set_title("Privacy spent per client (dashed: budget)")
    if result.series:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
