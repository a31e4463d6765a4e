#!/usr/bin/env python3
"""Benchmark merge + GGUF conversion: the seed's path against ours, on the same model, in one run.

seed: PEFT merge_and_unload + save_pretrained (whole model in memory), then convert_hf_to_gguf.py
ours: the streaming merge (one tensor at a time), then convert_hf_to_gguf.py
Each step runs as its own process under /usr/bin/time: wall seconds and peak RSS are printed per step
and in total, with the ratios, and the two GGUF files' tensors are compared byte for byte.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, UserError, run_main  # noqa: E402


def timed(cmd: list[str], logpath: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one command."""
    stats = logpath.with_suffix(".time")
    with open(logpath, "w") as logf:
        r = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%e %M", *cmd], stdout=logf,
                           stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise UserError(f"benchmark step failed: {' '.join(cmd[:3])} ... (log: {logpath})")
    wall, kib = stats.read_text().split()[-2:]
    return float(wall), int(kib) / (1 << 20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=ROOT / "out" / "base" / "smollm2")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "out" / "demo-checkpoint")
    p.add_argument("--quant", default="q8_0")
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-merge")
    p.add_argument("--llama-cpp", type=Path, default=ROOT / "vendor" / "llama.cpp")
    args = p.parse_args()
    if not shutil.which("/usr/bin/time"):
        raise UserError("/usr/bin/time is needed (Debian/Ubuntu: apt-get install time)")
    for needed in (args.base / "config.json", args.checkpoint / "adapter_config.json"):
        if not needed.exists():
            raise UserError(f"{needed} not found (run 'make merge' first, or pass --base/--checkpoint)")
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py, scripts, converter = sys.executable, ROOT / "scripts", str(args.llama_cpp / "convert_hf_to_gguf.py")
    results = {}
    for path, method in (("seed", "peft"), ("ours", "streaming")):
        merged, gguf = work / f"{path}-merged", work / f"{path}.{args.quant}.gguf"
        merge = timed([py, str(scripts / "merge_lora.py"), "--base", str(args.base), "--checkpoint",
                       str(args.checkpoint.resolve()), "--method", method, "--out", str(merged)], work / f"{path}-merge.log")
        convert = timed([py, converter, str(merged), "--outtype", args.quant, "--outfile", str(gguf)],
                        work / f"{path}-convert.log")
        results[path] = (merge, convert, gguf)
    print(f"\nmerge + {args.quant} GGUF of {args.base.name} with {args.checkpoint.name}\n")
    print(f"| path | merge s | convert s | total s | peak RSS GiB |\n|---|---|---|---|---|")
    for path, (merge, convert, _) in results.items():
        print(f"| {path} | {merge[0]:.1f} | {convert[0]:.1f} | {merge[0] + convert[0]:.1f} | "
              f"{max(merge[1], convert[1]):.2f} |")
    (sm, sc, sg), (om, oc, og) = results["seed"], results["ours"]
    print(f"\nspeed-up (seed / ours, total wall): {(sm[0] + sc[0]) / (om[0] + oc[0]):.2f}x; "
          f"merge step alone: {sm[0] / om[0]:.2f}x, peak RSS of the merge step: {sm[1]:.2f} -> {om[1]:.2f} GiB")
    same, differing = compare_gguf(sg, og)
    print(f"GGUF tensors (names, types, bytes) identical: {'yes' if same else 'no'}; metadata keys that differ: "
          f"{', '.join(differing) or 'none'} (general.* names come from the folder names)")


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
