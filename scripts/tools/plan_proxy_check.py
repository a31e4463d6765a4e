#!/usr/bin/env python3
"""Does the importance-weighted squared weight error (lib/quant_plan.py's measure(): PLAN_COST=weights, and the
tie-break of the KL plans) rank tensors as the true KL does? For each group of tensors (one kind in every layer:
attn_q, ..., ffn_down, token_embd), the model is quantized with that group at --low (q3_k, or its fallback) and
everything else at q8_0; its mean KL to the f16 GGUF on held-out text (the plan's own measure_groups(), here on
--text) is set beside the predicted error increase for the group, and the rank correlation of the two is printed
(1: the same order).

  scripts/tools/plan_proxy_check.py --f16 out/eval/model.f16.gguf --imatrix out/eval/imatrix/imatrix-....gguf \\
      --text out/eval/held_out.txt
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/, for lib
from lib.common import ROOT, UserError, log, run_main, run_tool  # noqa: E402
from lib.quant_plan import CANDIDATES, group_of, measure, measure_groups  # noqa: E402


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    for r, i in enumerate(order):
        out[i] = float(r)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--f16", type=Path, required=True, help="the f16 GGUF (make eval leaves out/eval/model.f16.gguf)")
    p.add_argument("--imatrix", type=Path, required=True, help="its importance matrix (out/eval/imatrix/*.gguf)")
    p.add_argument("--text", type=Path, required=True, help="held-out text (out/eval/held_out.txt)")
    p.add_argument("--low", default="q3_k", choices=list(CANDIDATES), help="the type each group is put at")
    p.add_argument("--chunks", type=int, default=8, help="chunks of 512 tokens scored (default: %(default)s)")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "plan-check", help="scratch folder")
    p.add_argument("--llama-cpp", type=Path, default=ROOT / "vendor" / "llama.cpp")
    args = p.parse_args()
    bin_dir = args.llama_cpp / "build" / "bin"
    for f in (args.f16, args.imatrix, args.text, bin_dir / "llama-perplexity"):
        if not f.exists():
            raise UserError(f"{f} not found")
    args.work.mkdir(parents=True, exist_ok=True)
    logpath = args.work / "log"
    threads = os.cpu_count() or 1
    pure = {}
    for cand in ("q8_0", args.low):
        pure[cand] = args.work / f"pure.{cand}.gguf"
        run_tool([bin_dir / "llama-quantize", "--imatrix", args.imatrix, "--pure", args.f16, pure[cand],
                  CANDIDATES[cand], threads], "llama-quantize", logpath)
    table = measure(args.f16, pure, args.imatrix)
    predicted: dict[str, float] = {}
    for name, opts in table.items():
        predicted[group_of(name)] = predicted.get(group_of(name), 0.0) + opts[args.low][2] - opts["q8_0"][2]
    kl = measure_groups(args.f16, args.imatrix, table, args.text, bin_dir, args.work, logpath, args.chunks)
    measured = {group: costs[args.low] for group, costs in kl.items()}
    for group in sorted(predicted):
        log(f"{group}: predicted {predicted[group]:.4g}, KL {measured[group]:+.5f}")
    groups = sorted(predicted, key=lambda g: -measured[g])
    print(f"\n| group at {args.low} (rest q8_0) | predicted error increase | KL increase (nats) |\n|---|---|---|")
    for g in groups:
        print(f"| {g} | {predicted[g]:.4g} | {measured[g]:.5f} |")
    print(f"\nSpearman rank correlation, predicted vs measured: "
          f"{spearman([predicted[g] for g in groups], [measured[g] for g in groups]):.2f} ({len(groups)} groups)")


if __name__ == "__main__":
    run_main(main)
