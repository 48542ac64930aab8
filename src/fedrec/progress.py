"""The live progress display of long runs (rich): round, task, loss, metrics, time left."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedrec.strategies.observed import RoundLog


class RoundProgress:
    """Context manager; ``on_round`` is the callback the server calls after each round."""

    def __init__(
        self, rounds: int, console: Console | None = None, *, label: str = "federated rounds"
    ) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.rounds = rounds
        self.task_id = self.progress.add_task("rounds", total=rounds)

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def on_round(self, server_round: int, rows: list[dict], rlog: RoundLog) -> None:
        parts = []
        for r in rows:
            loss = r.get("train_loss")
            loss_s = f"loss {loss:.3f} " if isinstance(loss, float) else ""
            parts.append(f"{r['task']}: {loss_s}HR@10 {r['hr@10']:.3f} NDCG@10 {r['ndcg@10']:.3f}")
        self.report(server_round, rlog.replies, len(rlog.failures), " | ".join(parts))

    def report(self, server_round: int, replies: int, failures: int, detail: str) -> None:
        """One line for a finished round (any kind of round), and the bar moved to it."""
        failed = f" [yellow]{failures} refused/failed[/]" if failures else ""
        self.progress.console.print(
            f"round {server_round}/{self.rounds} ({replies} clients){failed} | {detail}"
        )
        self.progress.update(self.task_id, completed=server_round)

    def stage(self, name: str) -> None:
        self.progress.console.print(f"[dim]{name}...[/]")
