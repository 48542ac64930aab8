"""What a partner site pays to start a ClientApp process, per message.

    .venv/bin/python benchmarks/clientapp_start.py [--repeats 9]

A SuperNode runs every message it pulls in a fresh ClientApp process (``fedrec client start``:
``python -I -m fedrec.deploy.guard clientapp``, which imports ``fedrec.client.app``). A round
of secure aggregation is four messages per site, and only one of them (the masked input)
trains; key exchange, unmasking, refusals and evaluation need no torch. This times, in fresh
interpreters run alternately (so a noisy machine hits all alike), the import of:

* ``flower``: ``flwr.clientapp``, the floor every ClientApp process pays;
* ``clientapp``: ``fedrec.client.app``, what a message that does not train loads;
* ``training``: that plus the training stack a training message loads (torch, the models,
  Opacus' accountants, the data loaders), which every message loaded until ``fedrec.client.app``
  deferred it.

Reported: the median wall seconds of each over the repeats, and training / clientapp.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

IMPORTS = {
    "flower": "import flwr.clientapp",
    "clientapp": "import fedrec.client.app",
    "training": "import fedrec.client.app, fedrec.client.local, fedrec.client.privacy, "
    "fedrec.client.fusion_query, fedrec.strategies.records, fedrec.workload",
}


def time_import(statement: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in IMPORTS}
    time_import(IMPORTS["training"])  # warm the file cache once; not counted
    for i in range(args.repeats):
        for name, statement in IMPORTS.items():
            times[name].append(time_import(statement))
        print(f"repeat {i + 1}/{args.repeats}", file=sys.stderr, flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:10s} median {med[name]:.2f} s  (min {min(t):.2f}, max {max(t):.2f})")
    print(f"training / clientapp: {med['training'] / med['clientapp']:.1f}x")


if __name__ == "__main__":
    main()
