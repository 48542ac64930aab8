"""Cost of fedrec's privacy accounting with and without its caches, side by side in one run.

    .venv/bin/python benchmarks/accounting_cost.py [RUN_DIR] [--repeats 2]

fedrec caches two pure functions of its accountants (fedrec.privacy.accounting): Opacus' RDP of
one sampled-Gaussian step at one order, and dp-accounting's PLD of one sampled Gaussian. Both
give bit-for-bit the figures of the uncached libraries (tests/test_privacy_accounting.py). This
times, each with the caches off and on (emptied before every timing, so nothing carries over):

* a client's noise calibration (``calibrate_noise``) for the sample rates and steps of a small
  silo of the default federation (q 0.4 / 0.4 / 0.2 at batch 16, 12 rounds, epsilon 8);
* ``audit_ledger`` of RUN_DIR's ledger, every line recomputed (what ``fedrec audit`` does). With
  no RUN_DIR, a small record-level DP simulation (4 clients, 2 rounds) is run first.

Prints the median seconds of the repeats and the ratio off / on.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from opacus.accountants.analysis import rdp as opacus_rdp

import fedrec.privacy.accounting as accounting
from fedrec.privacy import audit_ledger, calibrate_noise


@contextlib.contextmanager
def caches(on: bool) -> Iterator[None]:
    """fedrec's two accountant caches on (emptied) or off (the libraries' own functions)."""
    rdp_cached, pld_cached = opacus_rdp._compute_rdp, accounting._sampled_gaussian_pld
    for fn in (rdp_cached, pld_cached, accounting._epsilon_opacus, accounting._epsilon_dp_accounting):
        fn.cache_clear()  # type: ignore[attr-defined]
    if not on:
        opacus_rdp._compute_rdp = rdp_cached.__wrapped__  # type: ignore[attr-defined]
        accounting._sampled_gaussian_pld = pld_cached.__wrapped__  # type: ignore[attr-defined]
    try:
        yield
    finally:
        opacus_rdp._compute_rdp, accounting._sampled_gaussian_pld = rdp_cached, pld_cached


def timed(fn: Callable[[], object], on: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with caches(on):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def small_dp_run(root: Path) -> Path:
    from fedrec.config import load_config
    from fedrec.simulation import simulate

    cfg = load_config(
        None,
        {
            "dataset": "synthetic:merchants=4,users=160,items=300",
            "partition": "site",
            "rounds": 2,
            "seed": 1,
            "out": str(root / "run"),
            "privacy.mode": "record",
            "privacy.epsilon": 4.0,
            "privacy.delta": 1e-3,
        },
    )
    run, _ = simulate(cfg, baselines=False)
    return run.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tasks = ("recall", "ranking", "personal")

    def calibrate() -> object:
        return calibrate_noise(
            epsilon=8.0, delta=1e-3, rounds=12, task_shares=dict.fromkeys(tasks, 1.0),
            sample_rate=dict(zip(tasks, (0.4, 0.4, 0.2), strict=True)),
            steps_per_round=dict(zip(tasks, (20, 10, 4), strict=True)),
        )  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or small_dp_run(Path(tmp))
        ledger = run_dir / "privacy_ledger.jsonl"
        n_lines = sum(1 for _ in ledger.open())

        def audit() -> object:
            return audit_ledger(ledger, run_id=run_dir.name)

        for name, fn in (("calibrate one client", calibrate), (f"audit {n_lines} lines", audit)):
            off, on = timed(fn, False, args.repeats), timed(fn, True, args.repeats)
            print(f"{name}: {off:.2f} s uncached, {on:.2f} s cached, ratio {off / on:.1f}x",
                  flush=True)


if __name__ == "__main__":
    main()
