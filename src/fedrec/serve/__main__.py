"""``python -m fedrec.serve RUN_DIR [--host H] [--port P]``: serve a run over HTTP."""

from __future__ import annotations

import argparse

from fedrec.serve.server import serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fedrec.serve", description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    serve(args.run_dir, args.host, args.port)


if __name__ == "__main__":
    main()
