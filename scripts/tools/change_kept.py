#!/usr/bin/env python3
"""How much of the fine-tune's change each quantization type keeps, per group of tensors.

The change is the merged model's f16 GGUF less the base's (both written by the same converter, so the same
names and layout); a type keeps the share 1 + <Q - W, W - B> / |W - B|^2 of it (W merged, Q its quantization,
B base; inner products weighted by the importance matrix's column weights, over every 4th row): about 1 for
rounding that is noise to the change, 0 for a type that puts the base's weights back. docs/quality.md uses it
to show q5_1 rounding a fine-tune away on a base that came from a Q4_1 GGUF.

  scripts/tools/change_kept.py --f16 out/eval-odd/model.f16.gguf --base-f16 base.f16.gguf \\
      --imatrix out/eval-odd/imatrix/imatrix-....gguf --types Q8_0,Q5_0,Q5_1
(base.f16.gguf: vendor/llama.cpp/convert_hf_to_gguf.py out/base/smollm2 --outtype f16 --outfile base.f16.gguf)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/, for lib
from lib.common import ROOT, UserError, run_main, run_tool  # noqa: E402
from lib.quant_plan import group_of, importance, n_rows_of, rows_of  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--f16", type=Path, required=True, help="the merged model's f16 GGUF")
    p.add_argument("--base-f16", type=Path, required=True, help="the base's f16 GGUF, by the same converter")
    p.add_argument("--imatrix", type=Path, required=True, help="the merged model's importance matrix")
    p.add_argument("--types", default="Q8_0,Q5_0,Q5_1", help="llama-quantize types, each run --pure")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "change-kept", help="scratch folder")
    p.add_argument("--llama-cpp", type=Path, default=ROOT / "vendor" / "llama.cpp")
    args = p.parse_args()
    from gguf import GGUFReader
    quantize = args.llama_cpp / "build" / "bin" / "llama-quantize"
    for f in (args.f16, args.base_f16, args.imatrix, quantize):
        if not f.exists():
            raise UserError(f"{f} not found")
    args.work.mkdir(parents=True, exist_ok=True)
    weights = importance(args.imatrix)
    merged = {t.name: t for t in GGUFReader(args.f16).tensors}
    base = {t.name: t for t in GGUFReader(args.base_f16).tensors}
    types = args.types.split(",")
    quantized = {}
    for ftype in types:
        out = args.work / f"pure.{ftype}.gguf"
        run_tool([quantize, "--imatrix", args.imatrix, "--pure", args.f16, out, ftype, os.cpu_count() or 1],
                 "llama-quantize", args.work / "log")
        quantized[ftype] = {t.name: t for t in GGUFReader(out).tensors}
    kept: dict[tuple[str, str], list[float]] = {}
    for name, t in merged.items():
        if len(t.shape) != 2 or name not in base or name not in weights:
            continue
        rows = np.arange(0, n_rows_of(t), 4)
        w = rows_of(t, rows).astype(np.float64)
        change = w - rows_of(base[name], rows)
        norm = float(((change ** 2) @ weights[name]).sum())
        if norm == 0:
            continue  # a tensor the adapter does not touch
        for ftype, q in quantized.items():
            err = rows_of(q[name], rows) - w
            share = 1 + float(((err * change) @ weights[name]).sum()) / norm
            kept.setdefault((group_of(name), ftype), []).append(share)
    groups = sorted({g for g, _ in kept})
    print(f"\n| group | {' | '.join(types)} |\n|---|{'---|' * len(types)}")
    for g in groups:
        print(f"| {g} | " + " | ".join(f"{np.mean(kept[(g, f)]):.2f}" if (g, f) in kept else "-" for f in types)
              + " |")


if __name__ == "__main__":
    run_main(main)
