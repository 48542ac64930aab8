"""Append-only, hash-chained privacy ledger (``privacy_ledger.jsonl``), one line per DP release.

Each line is the canonical JSON (sorted keys, no spaces, ASCII) of one entry plus ``"\\n"``.
``hash`` is the SHA-256 of the canonical JSON of the entry without ``hash``; ``prev_hash`` is the
SHA-256 of the previous line's exact bytes (newline included), and for the first line a genesis
value bound to the run id. Editing, removing, reordering or inserting a line, or splicing in a
line of another run, therefore breaks the chain at that line (a hash chain as in Haber &
Stornetta 1991, "How to Time-Stamp a Digital Document"). Dropping lines from the *end* leaves a
valid shorter chain: publish ``head_hash`` somewhere else and pass it as ``expected_head``.

A *site ledger* (a deployed partner's own file, ``Ledger(..., site=True)``) holds the releases of
all runs the site took part in, in one chain: each line chains to the line before it whatever its
run, and the first line to the genesis of its own run id. Its lines keep the fields of a run
ledger; only the run id may change from line to line. A single-run ledger is a valid site ledger.

Appends take an exclusive ``fcntl.flock`` on the file, re-read and verify the chain under the lock,
write one line and ``fsync``: several processes may append to one run ledger.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedrec.errors import LedgerError
from fedrec.privacy.entry import CHAIN_FIELDS, RELEASE_FIELDS, LedgerEntry, field_problems
from fedrec.privacy.errors import PrivacyError

LEDGER_FILENAME = "privacy_ledger.jsonl"
_GENESIS_TAG = b"fedrec-privacy-ledger/v1/genesis/"

Source = str | os.PathLike[str] | bytes | Sequence[str | bytes]
PARTIAL_HINT = (
    "a crash cut an append short; its release never left, since a reply leaves only after its"
    " line is on disk: `fedrec ledger trim FILE` moves the partial line aside"
)


def genesis_hash(run_id: str) -> str:
    """The ``prev_hash`` of a run's first entry: binds the chain to its run id."""
    return hashlib.sha256(_GENESIS_TAG + run_id.encode("utf-8")).hexdigest()


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(
        canonical_json({k: v for k, v in entry.items() if k != "hash"})
    ).hexdigest()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    """Outcome of ``verify_chain``: ``problems`` name the line (1-based) they concern."""

    ok: bool
    problems: list[str]
    n_lines: int
    head_hash: str  # sha256 of the last complete line (genesis for an empty ledger)
    entries: list[dict[str, Any]] = field(default_factory=list, repr=False)  # well-formed ones


def verify_chain(
    source: Source,
    *,
    run_id: str | None = None,
    expected_head: str | None = None,
    site: bool = False,
) -> ChainReport:
    """Check a ledger file (path), its bytes, or its lines as ``readlines()`` returns them.

    ``run_id`` defaults to the first line's; every line must belong to it, unless ``site``: a
    site ledger accepts any run id per line (and takes no ``run_id``). ``expected_head``, if
    given, must equal the hash of the last line (detects lines dropped from the end).
    """
    if site and run_id is not None:
        raise PrivacyError("a site ledger holds several runs: verify it without run_id.")
    try:
        lines = _lines_of(source)
    except FileNotFoundError:
        return ChainReport(False, [f"ledger file {source!s} does not exist"], 0, "")
    problems: list[str] = []
    entries: list[dict[str, Any]] = []
    run = run_id
    prev: bytes | None = None
    for i, line in enumerate(lines, start=1):
        entry, line_problems = _check_line(i, line, prev, run, any_run=site)
        if run is None and not site and entry is not None and isinstance(entry.get("run_id"), str):
            run = entry["run_id"]
            entry, line_problems = _check_line(i, line, prev, run)
        problems += line_problems
        if entry is not None and not field_problems(entry):
            entries.append(entry)
        prev = line
    complete = [ln for ln in lines if ln.endswith(b"\n")]
    head = line_hash(complete[-1]) if complete else (genesis_hash(run) if run else "")
    if expected_head is not None and head != expected_head:
        problems.append(
            f"head hash {head[:12]}... is not the expected {expected_head[:12]}...: lines were "
            "removed from the end or the chain was rewritten"
        )
    return ChainReport(not problems, problems, len(lines), head, entries)


def _check_line(
    i: int, line: bytes, prev: bytes | None, run: str | None, *, any_run: bool = False
) -> tuple[dict[str, Any] | None, list[str]]:
    where = f"line {i}"
    if not line.endswith(b"\n"):
        return None, [f"{where}: truncated (no newline at the end): {PARTIAL_HINT}"]
    try:
        entry = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, [f"{where}: not valid JSON"]
    if not isinstance(entry, dict):
        return None, [f"{where}: not a JSON object"]
    if any_run:
        run = entry["run_id"] if isinstance(entry.get("run_id"), str) else None
    problems = [f"{where}: {p}" for p in field_problems(entry)]
    if isinstance(entry.get("hash"), str) and entry_hash(entry) != entry["hash"]:
        problems.append(f"{where}: hash does not match the content (the line was edited)")
    elif canonical_json(entry) + b"\n" != line:
        problems.append(f"{where}: not in canonical form (re-serialised or edited)")
    if run is not None and entry.get("run_id") != run:
        problems.append(f"{where}: run_id {entry.get('run_id')!r} is foreign to run {run!r}")
    if prev is None:
        if run is not None and entry.get("prev_hash") != genesis_hash(run):
            problems.append(
                f"{where}: prev_hash is not the genesis of run {run!r} (earlier lines removed?)"
            )
    elif entry.get("prev_hash") != line_hash(prev):
        problems.append(
            f"{where}: prev_hash does not match line {i - 1} (a line was removed, inserted or "
            "reordered)"
        )
    if entry.get("seq") != i - 1:
        problems.append(f"{where}: seq is {entry.get('seq')!r}, expected {i - 1}")
    return entry, problems


def _lines_of(source: Source) -> list[bytes]:
    if isinstance(source, (str, os.PathLike)):
        source = Path(source).read_bytes()
    if isinstance(source, bytes):
        return _split(source)
    return [ln.encode("utf-8") if isinstance(ln, str) else bytes(ln) for ln in source]


def _split(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    return lines + ([parts[-1]] if parts[-1] else [])


def read_ledger(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All entries of a ledger file in order. Raises ``LedgerError`` on a malformed line;
    this does not verify the chain (use ``verify_chain``)."""
    return _parse(_lines_of(path), path)


def _parse(source: bytes | list[bytes], path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    lines = _split(source) if isinstance(source, bytes) else source
    entries = []
    for i, line in enumerate(lines, start=1):
        if not line.endswith(b"\n"):
            raise LedgerError(f"{path}: line {i} is truncated ({PARTIAL_HINT})")
        try:
            entries.append(json.loads(line))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LedgerError(f"{path}: line {i} is not valid JSON") from err
    return entries


class Ledger:
    """The privacy ledger of one run, or with ``site`` a site's ledger of all its runs (appends
    still carry ``run_id``); ``append`` is safe across processes (file lock)."""

    def __init__(self, path: str | os.PathLike[str], run_id: str, *, site: bool = False) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise PrivacyError(f"run_id must be a non-empty string, got {run_id!r}.")
        self.path = Path(path)
        self.run_id = run_id
        self.site = site

    def append(self, fields: Mapping[str, Any] | LedgerEntry) -> dict[str, Any]:
        """Validate, chain and durably append one entry; returns the entry as written."""
        release = fields.to_fields() if isinstance(fields, LedgerEntry) else dict(fields)
        problems = field_problems(release, required=RELEASE_FIELDS)
        reserved = sorted(set(release) & set(CHAIN_FIELDS))
        if reserved:
            problems.append(f"field(s) {', '.join(reserved)} are set by the ledger; leave them out")
        if problems:
            raise PrivacyError("invalid ledger entry: " + "; ".join(problems))
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                entry = self._append_locked(fh, release)
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        if created:
            _fsync_dir(self.path.parent)
        return entry

    def _append_locked(self, fh: Any, release: dict[str, Any]) -> dict[str, Any]:
        fh.seek(0)
        data = fh.read()
        report = self._verify(data)
        if not report.ok:
            raise LedgerError(
                f"refusing to append to {self.path}: the chain does not verify: "
                + "; ".join(report.problems[:5])
            )
        lines = _split(data)
        entry = {
            **release,
            "seq": len(lines),
            "run_id": self.run_id,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "prev_hash": line_hash(lines[-1]) if lines else genesis_hash(self.run_id),
        }
        entry["hash"] = entry_hash(entry)
        fh.write(canonical_json(entry) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
        return entry

    def read(self) -> list[dict[str, Any]]:
        """All entries, read under a shared lock: never half of a concurrent append."""
        return _parse(read_locked(self.path), self.path) if self.path.exists() else []

    def verify(self, *, expected_head: str | None = None) -> ChainReport:
        return self._verify(self.path, expected_head=expected_head)

    def _verify(self, source: Source, *, expected_head: str | None = None) -> ChainReport:
        run_id = None if self.site else self.run_id
        return verify_chain(source, run_id=run_id, expected_head=expected_head, site=self.site)


def set_aside_partial_line(path: str | os.PathLike[str]) -> Path | None:
    """Move a ledger's half-written last line (no newline: an append a crash cut short) into
    ``<ledger>.partial-<UTC time>`` and cut the ledger back to its complete lines, under the
    ledger's lock; None when its last line is complete. The partial line's release never left:
    a client replies only after its line is appended, flushed and fsynced. Nothing is moved
    unless every complete line chains (``LedgerError``): this is not a way to drop lines."""
    path = Path(path)
    with open(path, "r+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            data = fh.read()
            if not data or data.endswith(b"\n"):
                return None
            cut = data.rfind(b"\n") + 1
            report = verify_chain(data[:cut], site=True)
            if not report.ok:
                raise LedgerError(f"{path}: its complete lines do not chain, so nothing was "
                                  "moved: " + "; ".join(report.problems[:3]))  # fmt: skip
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            aside = path.with_name(f"{path.name}.partial-{stamp}")
            with open(aside, "xb") as out:
                out.write(data[cut:])
                out.flush()
                os.fsync(out.fileno())
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    _fsync_dir(path.parent)
    return aside


def read_locked(path: str | os.PathLike[str]) -> bytes:
    """A ledger file's bytes under a shared lock (appends take an exclusive one)."""
    with open(path, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        try:
            return fh.read()
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
