#!/usr/bin/env python3
"""Time a new user's first `make`: a fresh clone of this repository's HEAD into an empty folder, an empty
llama.cpp build cache and no pip cache, then one chat request to the server it starts.

Prints make's own stage summary, the seconds to a served answer and those of a second `make` (nothing to redo),
then stops the server. The clone is left in --workdir for a look at out/logs/.

  python3 scripts/tools/time_fresh_make.py --workdir /tmp/fresh-make
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/, for lib
from lib.common import ROOT, UserError, log, run_main  # noqa: E402


def chat(port: int) -> str:
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a fairy tale"}], "max_tokens": 40})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body.encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="where the clone goes (emptied first)")
    p.add_argument("--port", type=int, default=8097, help="port of the server make starts (default %(default)s)")
    p.add_argument("make_args", nargs="*", help="more make arguments, e.g. PIPELINE_JOBS=1")
    args = p.parse_args()

    clone = args.workdir.resolve() / "lora-ship"
    if clone.exists():
        shutil.rmtree(clone)
    clone.parent.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)]).returncode != 0:
        raise UserError(f"git clone of {ROOT} failed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env.update(LORA_SHIP_CACHE=str(clone / "out" / "build-cache"), PIP_NO_CACHE_DIR="1")
    make = ["make", "--no-print-directory", "-C", str(clone), f"PORT={args.port}", *args.make_args]
    log(f"fresh make in {clone} (log: {clone}.make.log) ...")
    start = time.monotonic()
    with open(f"{clone}.make.log", "w") as logf:
        rc = subprocess.run(make, stdout=logf, stderr=subprocess.STDOUT, env=env).returncode
    try:
        if rc != 0:
            raise UserError(f"make failed (exit {rc}); see {clone}.make.log")
        answer = chat(args.port)
        first_answer = time.monotonic() - start
        summary = Path(f"{clone}.make.log").read_text().split(">>> stage times:")[-1]
        print(">>> stage times:" + summary.rstrip())
        again = time.monotonic()
        subprocess.run(make, capture_output=True, env=env, check=True)
        print(f"first answer after {first_answer:.0f} s: {answer.strip()[:80]!r}")
        print(f"make again: {time.monotonic() - again:.0f} s")
    finally:
        subprocess.run([*make, "stop"], capture_output=True, env=env)


if __name__ == "__main__":
    run_main(main)
