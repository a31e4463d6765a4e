#!/usr/bin/env python3
"""Benchmark merge + GGUF conversion: the seed's path against ours, on the same model, in one run.

seed: PEFT merge_and_unload + save_pretrained (whole model in memory, a 16-bit copy on disk),
      then llama.cpp's convert_hf_to_gguf.py on that copy
ours: merge_gguf.py: the base tensors streamed through the adapter straight into the GGUF
Each step runs as its own process: wall seconds and peak RSS (the child's own, from wait4) are printed per
step and in total, with the ratios; then the two GGUF files are compared tensor by tensor. Each step starts
after a sync, so none is slowed by the disk still flushing an earlier step's output.
--model 8b-random writes a random Llama-3.1-8B-shaped base and a seed-style adapter first (16 GB of disk).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/, for lib
from lib.common import ROOT, UserError, add_checkpoint_args, run_main  # noqa: E402


def timed(cmd: list[str], logpath: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one command. Each starts after the previous ones' writes have reached
    the disk, so no step pays for flushing another's output (the seed path writes 23 GB for an 8B model)."""
    os.sync()
    start = time.perf_counter()
    with open(logpath, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise UserError(f"benchmark step failed: {' '.join(cmd[:3])} ... (log: {logpath})")
    return wall, usage.ru_maxrss / (1 << 20)  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=ROOT / "out" / "base" / "smollm2", help="base model folder")
    add_checkpoint_args(p, ROOT / "quantization" / "checkpoints", ROOT / "quantization" / "demo-checkpoint")
    p.add_argument("--model", choices=["default", "8b-random"], default="default",
                   help="8b-random: a random Llama-3.1-8B-shaped base and seed-style adapter, built in --workdir "
                        "(the --base folder lends its tokenizer)")
    p.add_argument("--quant", default="q8_0")
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-merge")
    p.add_argument("--llama-cpp", type=Path, default=ROOT / "vendor" / "llama.cpp")
    args = p.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    py, scripts, converter = sys.executable, ROOT / "scripts", str(args.llama_cpp / "convert_hf_to_gguf.py")
    if args.model == "8b-random":
        if subprocess.run([py, str(scripts / "tools" / "random_model.py"), "--out", str(work / "8b-random"),
                           "--tokenizer", str(args.base)]).returncode != 0:
            raise UserError("random_model.py failed")
        args.base, ckpt = work / "8b-random" / "base", work / "8b-random" / "adapter"
    else:
        from lib.checkpoints import select_checkpoint
        ckpt = select_checkpoint(args.checkpoints_dir, args.checkpoint, args.fallback)
    if not (args.base / "config.json").exists():
        raise UserError(f"{args.base / 'config.json'} not found (run 'make base' first, or pass --base)")
    for old in work.glob("*.gguf"):
        old.unlink()
    shutil.rmtree(work / "seed-merged", ignore_errors=True)
    ckpt = str(ckpt.resolve())
    seed_gguf, ours_gguf = work / f"seed.{args.quant}.gguf", work / f"ours.{args.quant}.gguf"
    steps = {
        "seed merge (PEFT)": [py, str(scripts / "merge_lora.py"), "--base", str(args.base), "--checkpoint", ckpt,
                              "--method", "peft", "--out", str(work / "seed-merged")],
        "seed convert": [py, converter, str(work / "seed-merged"), "--outtype", args.quant, "--outfile",
                         str(seed_gguf)],
        "ours (merge_gguf.py)": [py, str(scripts / "merge_gguf.py"), "--base", str(args.base), "--checkpoint", ckpt,
                                 "--quant", args.quant, "--out", str(ours_gguf), "--llama-cpp", str(args.llama_cpp),
                                 "--round-to-base-dtype"],  # rounded as the seed's merged copy, for the byte check
    }
    results = {}
    for name, cmd in steps.items():
        results[name] = timed(cmd, work / (name.split()[0] + "-" + name.split()[1].strip("()").replace(".", "-") + ".log"))
        print(f"  {name}: {results[name][0]:.1f} s, peak RSS {results[name][1]:.2f} GiB", flush=True)
    shutil.rmtree(work / "seed-merged", ignore_errors=True)
    (sm, sm_rss), (sc, sc_rss), (ours, ours_rss) = results.values()
    print(f"\nmerge + {args.quant} GGUF of {args.base.name} with {Path(ckpt).name} ({os.cpu_count()} cores)\n")
    print("| path | merge s | convert s | total s | peak RSS GiB |\n|---|---|---|---|---|")
    print(f"| seed: PEFT merge, save, convert_hf_to_gguf | {sm:.1f} | {sc:.1f} | {sm + sc:.1f} | "
          f"{max(sm_rss, sc_rss):.2f} |")
    print(f"| ours: streamed merge straight into GGUF | - | - | {ours:.1f} | {ours_rss:.2f} |")
    print(f"\nspeed-up (seed total / ours): {(sm + sc) / ours:.2f}x; peak RSS {max(sm_rss, sc_rss):.2f} -> "
          f"{ours_rss:.2f} GiB; no merged copy written (the base is {human(args.base)})")
    sys.path.insert(0, str(args.llama_cpp / "gguf-py"))  # the reader of the same gguf-py that wrote them
    same, differing = compare_gguf(seed_gguf, ours_gguf)
    print(f"GGUF tensors (names, types, bytes) identical: {'yes' if same else 'NO'}; metadata keys that differ: "
          f"{', '.join(differing) or 'none'} (general.name: the seed's comes from its folder name)")
    if not same:
        raise UserError("the two GGUF files differ")


def human(base: Path) -> str:
    from lib.common import dir_size, human_bytes
    return human_bytes(dir_size(base))


def compare_gguf(a: Path, b: Path) -> tuple[bool, list[str]]:
    import numpy as np
    from gguf import GGUFReader
    ra, rb = GGUFReader(a), GGUFReader(b)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    same = ta.keys() == tb.keys() and all(
        ta[n].tensor_type == tb[n].tensor_type and np.array_equal(ta[n].data, tb[n].data) for n in ta)
    keys = sorted(set(ra.fields) | set(rb.fields))
    differing = [k for k in keys if k not in ra.fields or k not in rb.fields
                 or str(ra.fields[k].contents()) != str(rb.fields[k].contents())]
    return same, differing


if __name__ == "__main__":
    run_main(main)
