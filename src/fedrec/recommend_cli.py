"""``fedrec recommend`` and ``fedrec serve``: a run's recommender from the shell or over HTTP.

``add_parsers`` registers both sub-commands on ``fedrec``'s sub-parsers; user mistakes raise
:class:`fedrec.fusion.options.RecommendError` (a ``ValueError``), which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from fedrec.fusion.options import AUTO_IVF_ITEMS, RECALL_INDEXES, RecommendError

if TYPE_CHECKING:  # the recommender imports torch and the models: only when a command runs
    from fedrec.fusion.pipeline import Recommendation
    from fedrec.workload import Workload

DEFAULT_PORT = 8000
SERVE_PACKAGES = ("fastapi", "uvicorn", "starlette", "pydantic")  # fedrec[serve]
MAX_SHOWN_USERS = 5  # example user ids named when a user is unknown
RECALL_INDEX_HELP = (f"recall search: exact, an IVF index (approximate, for large catalogues) or "
                     f"auto = the index from {AUTO_IVF_ITEMS:,} items up (default auto)")


def add_parsers(subparsers: Any) -> None:
    """Add ``recommend`` and ``serve`` to the ``fedrec`` command's sub-parsers."""
    p = subparsers.add_parser("recommend", help="top-k items of a run for a user or a history")
    p.add_argument("run_dir", help="a finished run directory (config.toml, models/)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a raw user id of the dataset: uses their training history")
    who.add_argument("--history", help="file of raw item ids, one a line, oldest first; - = stdin")
    p.add_argument("-k", type=int, default=10, help="items to recommend (default 10)")
    p.add_argument("--category", help="only recommend items of this category")
    p.add_argument("--include-seen", action="store_true", help="allow items in the history")
    p.add_argument("--recall-index", choices=RECALL_INDEXES, default="auto", help=RECALL_INDEX_HELP)
    p.set_defaults(func=cmd_recommend)
    s = subparsers.add_parser("serve", help="serve a run's recommender over HTTP (FastAPI)")
    s.add_argument("run_dir", help="a finished run directory (config.toml, models/)")
    s.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    s.add_argument("--recall-index", choices=RECALL_INDEXES, default="auto", help=RECALL_INDEX_HELP)
    s.set_defaults(func=cmd_serve)


def _port(text: str) -> int:
    """A TCP port, 1-65535 (a larger one wrapped around silently)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return port


def cmd_recommend(args: argparse.Namespace) -> int:
    """Print the top-k table for ``--user`` or ``--history``."""
    from fedrec.fusion.pipeline import Recommender

    rec = Recommender.from_run_dir(args.run_dir, recall_index=args.recall_index)
    features: dict[str, str] | None = None
    history: list[str | int]
    if args.user is not None:
        items, features = user_history(_workload(args.run_dir), args.user)
        history = list(items)
        who = f"user {args.user}"
    else:
        history, who = read_history(args.history), f"history {args.history}"
    rows = rec.recommend(history, args.k, exclude_seen=not args.include_seen,
                         category=args.category, user_features=features)
    err = Console(stderr=True)
    err.print(f"{who}: {len(history)} items in the history; fusion "
              f"{rec.fuser.method} over {', '.join(rec.models)}")
    if sys.stdout.isatty():
        Console().print(recommendation_table(rows, f"top {args.k} for {who}"))
    else:  # piped: tab-separated, every id whole
        print(recommendation_tsv(rows))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the run on ``--host:--port`` until interrupted."""
    try:
        from fedrec.serve import serve
    except ImportError as err:
        if (err.name or "").split(".")[0] not in SERVE_PACKAGES:  # not the extra: a real fault
            raise
        raise RecommendError(f"fedrec serve needs FastAPI and uvicorn ({err}); "
                             "install them with: pip install 'fedrec[serve]'") from err
    Console(stderr=True).print(f"serving {args.run_dir} on http://{args.host}:{args.port} "
                               f"(API docs at /docs; Ctrl-C stops)")
    serve(args.run_dir, args.host, args.port, recall_index=args.recall_index)
    return 0


def user_history(work: Workload, user_id: str) -> tuple[list[int], dict[str, str]]:
    """All the user's items (oldest first) and their categorical features: serving comes after
    evaluation, so the validation and test items, the user's latest, are history too (they
    were left out of the input and could be recommended back)."""
    users = work.dataset.users
    match = users.index[users["user_id"].astype(str) == str(user_id)]
    if len(match) == 0:
        examples = users["user_id"].astype(str).head(MAX_SHOWN_USERS).tolist()
        raise RecommendError(f"unknown user {user_id!r}; the dataset's user ids look like "
                             f"{examples}")
    row = int(match[0])
    events = work.dataset.interactions
    mine = events[events["user"] == row].sort_values("timestamp", kind="stable")
    feats = {f: str(users.at[row, f]) for f in work.dataset.user_features}
    return mine["item"].astype(int).tolist(), feats


def read_history(path: str) -> list[str | int]:
    """Raw item ids from a file (one a line; blank lines and '#' comments skipped)."""
    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path)
        if not p.is_file():
            raise RecommendError(f"{p}: history file not found; give one raw item id per line")
        text = p.read_text()
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def recommendation_tsv(rows: list[Recommendation]) -> str:
    """Rank, item, title, category, fused score, then each task's score, tab-separated."""
    parts = list(rows[0]["explanation"]) if rows else []
    lines = ["\t".join(["rank", "item", "title", "category", "score", *parts])]

    def cell(text: str) -> str:  # a tab or a line break in a title would split the row
        return " ".join(str(text).split())

    for i, r in enumerate(rows, 1):
        cells = [str(i), cell(r["item"]), cell(r["title"]), cell(r["category"]),
                 f"{r['score']:.6f}"]  # fmt: skip
        lines.append("\t".join([*cells, *(f"{r['explanation'][t]:.6f}" for t in parts)]))
    return "\n".join(lines)


def recommendation_table(rows: list[Recommendation], title: str) -> Table:
    """A rich table: rank, item, title, category, fused score, then each task's score."""
    table = Table(title=title)
    parts = list(rows[0]["explanation"]) if rows else []
    for col in ("#", "item", "title", "category", "score", *parts):
        table.add_column(  # an item id is folded, never cut short: it must stay copyable
            col, justify="right" if col not in ("title", "category") else "left",
            overflow="fold" if col == "item" else "ellipsis", min_width=4 if col == "item" else None,
        )
    for i, r in enumerate(rows, 1):
        expl = [f"{r['explanation'][t]:.3f}" for t in parts]
        table.add_row(str(i), r["item"], r["title"], r["category"], f"{r['score']:.3f}", *expl)
    return table


def _workload(run_dir: str) -> Workload:
    from fedrec.config import load_config
    from fedrec.workload import build_workload

    return build_workload(load_config(Path(run_dir) / "config.toml"))
