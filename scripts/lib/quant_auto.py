"""QUANT=auto: the smallest GGUF whose KL to the 16-bit model, on held-out text, is within MAX_KL (or, with
MAX_SIZE, the closest one within that size).

The candidates (k-quants with the importance matrix, the per-tensor plans of lib/quant_plan.py, q8_0) are made
from the f16 GGUF from small to large and scored with llama-perplexity --kl-divergence against the f16 GGUF's
own logits, on text the importance matrix never saw (the held-out tales of the training data, or the last fifth
of a plain-text calibration file: lib/imatrix.Calibration.held_out). With MAX_KL the search stops at the first
candidate within it; with MAX_SIZE every candidate up to that size is scored and the lowest KL kept. The table
it chose from is printed and written into the GGUF (lora_ship.quant_auto).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lib.common import UserError, human_bytes, log, run_tool

CANDIDATES = ("Q3_K_S", "Q3_K_M", "Q3_K_M+", "Q4_K_S", "Q4_K_M", "Q4_K_M+", "Q5_K_M", "Q5_K_M+", "Q6_K", "q8_0")
AUTO_KEY = "lora_ship.quant_auto"
CTX = 512
MAX_EVAL_CHUNKS = 8


def parse_size(text: str) -> int:
    """Bytes from '90M', '1.5G', '800MiB', '123456'."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise UserError(f"MAX_SIZE={text}: write a size such as 90M or 4.5G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def mean_kl(perplexity: Path, model: Path, common: list, logpath: Path) -> tuple[float, float]:
    """(mean KL, top-1 agreement) of model against the --kl-divergence-base logits in common."""
    text = run_tool([perplexity, "-m", model, *common, "--kl-divergence"], "llama-perplexity", logpath)
    kl, top = re.search(r"Mean\s+KLD:\s*([-\d.e]+)", text), re.search(r"Same top p:\s*([\d.]+)", text)
    if not kl or not top:
        raise UserError(f"could not read llama-perplexity's KL (log: {logpath})")
    return float(kl.group(1)), float(top.group(1)) / 100


def table_text(rows: list[dict], chosen: str | None) -> str:
    lines = ["| candidate | size | KL to f16 (nats) | top-1 agreement | |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quant']} | {human_bytes(r['bytes'])} | {r['kl']:.5f} | {r['top1'] * 100:.2f}% | "
                     f"{'chosen' if r['quant'] == chosen else ''} |")
    return "\n".join(lines)


def choose_smallest(f16: Path, out: Path, imatrix: Path, calibration: Path, held_out: str, bin_dir: Path,
                    logpath: Path, max_kl: float | None, max_size: int | None, candidates=CANDIDATES,
                    plan_cost: str = "kl") -> dict:
    """Write the chosen candidate to out; return {"chosen", "max_kl", "max_size", "table"}. calibration: the
    importance matrix's text, on which the plans' costs are measured (never held_out)."""
    from lib.quant_plan import add_metadata, plan_base, plan_table, quantize_with_plan
    work = out.with_name(out.name + ".auto")
    work.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    text = work / "held_out.txt"
    text.write_text(held_out, encoding="utf-8")
    common = ["-f", text, "--ctx-size", CTX, "--batch-size", CTX, "--chunks", MAX_EVAL_CHUNKS, "--threads", threads,
              "--kl-divergence-base", work / "f16.kld"]
    try:
        log_text = run_tool([bin_dir / "llama-perplexity", "-m", f16, *common], "llama-perplexity", logpath)
        if "you need at least" in log_text or "Final estimate" not in log_text and "PPL" not in log_text:
            raise UserError("the held-out text is too short to score the candidates")
        rows, table, chosen = [], None, None
        for quant in candidates:
            path = work / f"{quant}.gguf"
            if plan_base(quant):
                table = table or plan_table(f16, imatrix, calibration, bin_dir, work / "plan", logpath, plan_cost)
                quantize_with_plan(f16, path, quant, imatrix, calibration, bin_dir, logpath, table)
            else:
                run_tool([bin_dir / "llama-quantize", "--imatrix", imatrix, f16, path, quant, threads],
                         "llama-quantize", logpath)
            size = path.stat().st_size
            if max_size is not None and size > max_size:
                path.unlink()
                continue
            kl, top1 = mean_kl(bin_dir / "llama-perplexity", path, common, logpath)
            rows.append({"quant": quant, "bytes": size, "kl": kl, "top1": top1})
            log(f"{quant}: {human_bytes(size)}, KL {kl:.5f}, top-1 {top1 * 100:.2f}%")
            if max_size is None:
                if kl <= max_kl:
                    chosen = quant
                    break
                path.unlink()
        if max_size is not None and rows:
            chosen = min(rows, key=lambda r: r["kl"])["quant"]
        print(table_text(rows, chosen), flush=True)
        if chosen is None:
            raise UserError(f"no candidate is within MAX_KL={max_kl} (the table above): raise MAX_KL, or name QUANT"
                            if max_size is None else f"no candidate fits MAX_SIZE={human_bytes(max_size)}")
        result = {"chosen": chosen, "max_kl": max_kl, "max_size": max_size, "table": rows}
        add_metadata(work / f"{chosen}.gguf", out, {AUTO_KEY: json.dumps(result, separators=(",", ":"))})
        log(f"chose {chosen} ({human_bytes(out.stat().st_size)})")
        return result
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


class Auto:
    """QUANT=auto's settings (--max-kl, --max-size), checked before the merge; called with the f16 GGUF."""

    def __init__(self, args, logpath: Path):
        self.max_size = parse_size(args.max_size) if args.max_size else None
        self.max_kl = None if self.max_size is not None else args.max_kl
        if self.max_kl is not None and self.max_kl <= 0:
            raise UserError(f"MAX_KL must be above 0, not {args.max_kl}")
        self.bin_dir, self.logpath = args.llama_cpp / "build" / "bin", logpath
        from lib.quants import quant_key
        self.candidates = [quant_key(c) for c in args.candidates.split(",")]
        if "auto" in self.candidates:
            raise UserError("--candidates: auto is not a candidate")
        if not (self.bin_dir / "llama-perplexity").exists():
            raise UserError(f"{self.bin_dir / 'llama-perplexity'} not found: run 'make vendor'")

    def __call__(self, f16: Path, out: Path, imatrix: Path, calibration: Path, held_out: str,
                 plan_cost: str = "kl") -> dict:
        if len(held_out) < 4 * CTX * 2:
            raise UserError("QUANT=auto needs held-out text to score on: a tales .jsonl with held-out tales, or a "
                            "longer calibration text (its last fifth is held out)")
        return choose_smallest(f16, out, imatrix, calibration, held_out, self.bin_dir, self.logpath, self.max_kl,
                               self.max_size, self.candidates, plan_cost)


def add_auto_args(p) -> None:
    p.add_argument("--max-kl", type=float, default=0.01, help="QUANT=auto: the largest mean KL to the 16-bit model "
                   "on held-out text (default: %(default)s nats)")
    p.add_argument("--max-size", help="QUANT=auto: instead, the lowest KL within this size (90M, 1.5G, ...)")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="QUANT=auto: the types tried, small to large "
                   "(default: %(default)s)")
