#!/usr/bin/env python3
"""Run the same prompt through several models or stages and tabulate load time, speed and memory (seed 003).

  compare.py out/base/smollm2 out/merged out/merged:nf4 out/model.q8_0.gguf

Each MODEL is a Hugging Face folder or a .gguf file, optionally with :nf4, :int8 or :16bit (the load mode,
default 16bit; GGUF files run through llama-cpp-python). Every model runs in its own generate.py process, so
its memory is fully returned before the next one loads; the answers are printed as they stream, then a table.
Flags after -- go to generate.py (e.g. -- --greedy --max-new-tokens 64).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import UserError, human_bytes, log, run_main  # noqa: E402


def parse_model(spec: str) -> tuple[Path, str]:
    name, _, load = spec.rpartition(":")
    if load not in ("nf4", "int8", "16bit"):  # no load mode given (or a ':' in the path itself)
        name, load = spec, ""
    path = Path(name)
    if not path.exists():
        raise UserError(f"model {path} does not exist")
    if path.suffix != ".gguf" and not (path / "config.json").exists():
        raise UserError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    return path, load or "16bit"


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model folders or .gguf files, each optionally :nf4|:int8|:16bit")
    p.add_argument("--prompt", default="Tell me a Grimm-style fairy tale about a poor little boy.")
    args = p.parse_args(argv)
    models = [parse_model(m) for m in args.models]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (path, load) in enumerate(models):
            stats_file = Path(tmp) / f"{i}.json"
            print(f"\n=== {path} ({'llama-cpp-python' if path.suffix == '.gguf' else load}) ===", flush=True)
            cmd = [sys.executable, str(Path(__file__).with_name("generate.py")), "--model", str(path), "--load",
                   load, "--prompt", args.prompt, "--stats-json", str(stats_file), *extra]
            proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
                log(f"{path}: failed ({reason})")
                rows.append((path, load, None))
                continue
            rows.append((path, load, json.loads(stats_file.read_text())))
    print(f"\nprompt: {args.prompt!r}\n")
    print("| model | load | load s | new tokens | tokens/s | weights in memory | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for path, load, s in rows:
        mode = "gguf (llama-cpp-python)" if path.suffix == ".gguf" else load
        if s is None:
            print(f"| {path} | {mode} | failed | | | | |")
            continue
        print(f"| {path} | {mode} | {s['load_seconds']:.1f} | {s['tokens']} | {s['tokens_per_second']:.1f} | "
              f"{human_bytes(s['footprint_bytes'])} | {human_bytes(s['peak_rss_bytes'])} |")
    if any(s is None for _, _, s in rows):
        raise UserError("some models failed (see above)")


if __name__ == "__main__":
    run_main(main)
