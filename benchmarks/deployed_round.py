"""Wall time of secure-aggregation rounds on a real local federation, per protocol stage.

    .venv/bin/python benchmarks/deployed_round.py [--rounds 3] [--no-dp] [--keep DIR]

Starts what the deployment end-to-end test starts (``fedrec.tests.test_deploy_e2e``): a
SuperLink with TLS and SuperNode authentication on 127.0.0.1, and three partner sites, each a
SuperNode behind fedrec's site guard holding one merchant of a small synthetic shop (90 users,
150 items). It runs fedrec with secure aggregation (and record-level DP at epsilon 8, unless
``--no-dp``) for ``--rounds`` rounds and prints, per round, the server's wall seconds in each
stage of the protocol (``summary.json``: ``secure_aggregation``). Every message a site answers
runs in a fresh ClientApp process, so the key-exchange stages measure mostly process start-up
(``benchmarks/clientapp_start.py``), the masked-input stage the training.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fedrec.config import load_config
from fedrec.deploy.server import submit_run, wait_for_run
from fedrec.tests.test_deploy_e2e import Federation

STAGES = ("setup", "share_keys", "masked_input", "unmask", "reconstruct")
SITES = ("acme", "globex", "initech")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep the federation's files here")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="fedrec-deployed-round-"))
    fed = Federation(root)
    try:
        fed.setup()
        for i, name in enumerate(SITES):
            fed.start(name, i)
            print(f"site {name} connected", file=sys.stderr, flush=True)
        settings = {
            "dataset": str(fed.data),
            "partition": "site",
            "rounds": args.rounds,
            "out": str(root / "run"),
            "tasks": {t: {"dim": 16, "local_epochs": 1} for t in ("recall", "ranking", "personal")},
            "secure_aggregation": True,
        }
        if not args.no_dp:
            settings["privacy"] = {"mode": "record", "epsilon": 8.0, "delta": 1e-3}
        run_id = submit_run(fed.site, load_config(None, settings))
        print(f"run {run_id} submitted; waiting", file=sys.stderr, flush=True)
        status = wait_for_run(fed.site, run_id, timeout=600 * args.rounds)
        if status != "finished:completed":
            sys.exit(f"the run ended {status}; see {root}")
    finally:
        fed.close()
    summary = json.loads((root / "run" / "summary.json").read_text())
    rounds = summary["secure_aggregation"]["rounds"]
    print("round  " + "  ".join(f"{s:>12s}" for s in STAGES) + "         all")
    for r in sorted(rounds, key=int):
        secs = [rounds[r].get(f"secagg.seconds.{s}", 0.0) for s in STAGES]
        print(f"{r:>5}  " + "  ".join(f"{x:12.2f}" for x in secs) + f"  {sum(secs):10.2f}")


if __name__ == "__main__":
    main()
