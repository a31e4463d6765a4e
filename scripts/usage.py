#!/usr/bin/env python3
"""Print the usage of a shared server per tenant and model, from its usage log (out/logs/usage.jsonl).

  usage.py --log out/logs/usage.jsonl
Columns: requests, errors (HTTP 4xx/5xx), aborted (the client left first), prompt / cached prompt / completion
tokens, mean time to first token and mean total time. The log's format: scripts/lib/usage.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import ROOT, run_main  # noqa: E402
from lib.usage import read_usage, table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", type=Path, default=ROOT / "out" / "logs" / "usage.jsonl")
    args = p.parse_args()
    records = read_usage(args.log)
    print(table(records) if records else f"no requests in {args.log} yet")


if __name__ == "__main__":
    run_main(main)
