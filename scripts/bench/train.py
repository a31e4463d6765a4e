#!/usr/bin/env python3
"""Benchmark fine-tuning: the seed's QLoRA recipe against ours, one lever at a time, in one run.

Each variant is a short train_lora.py run in its own process on the same base, data, global batch (24 x 512
tokens on a GPU), learning rate and seed, so the held-out loss is compared after the same tokens. Printed per
variant: tokens/s (steps after the first), seconds per optimizer step, peak GPU memory (allocated), held-out
loss before and after (nf4 changes the starting model, so
compare the change); then a Markdown table. --model 8b-random trains a random Llama-3.1-8B-shaped base (16 GB of
disk; needs a GPU). Without a CUDA GPU only the cpu recipe can run, and the table says so.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/, for lib and train_lora
from lib.common import ROOT, UserError, log, run_main  # noqa: E402
from train_lora import KERNEL_PACKAGES  # noqa: E402

# name -> (what changes from the line above it, train_lora.py flags)
GPU_VARIANTS = {
    "seed-002": ("seed 002: nf4 QLoRA, gradient checkpointing, 6 x 4, paged AdamW 8-bit, PEFT's fp32 upcast of the "
                 "unquantized parameters, Transformers' loss",
                 ["--recipe", "seed", "--upcast-fp32", "on", "--compile", "off", "--batch-size", "6", "--grad-accum",
                  "4", "--chunked-loss", "off"]),
    "seed": ("ours (RECIPE=seed): the same QLoRA with those left bf16, layers compiled, 12 x 2, loss in chunks",
             ["--recipe", "seed"]),
    "seed-no-ckpt": ("- gradient checkpointing", ["--recipe", "seed", "--gradient-checkpointing", "off"]),
    "bf16-ckpt": ("bf16 base instead of nf4 (checkpointing back on, not compiled, 6 x 4)",
                  ["--recipe", "fast", "--load", "bf16", "--gradient-checkpointing", "on", "--compile", "off"]),
    "bf16": ("bf16 base, no checkpointing", ["--recipe", "fast", "--load", "bf16", "--compile", "off"]),
    "bf16-12x2": ("micro-batch 12 x 2 instead of 6 x 4", ["--recipe", "fast", "--load", "bf16", "--compile", "off",
                                                          "--batch-size", "12", "--grad-accum", "2"]),
    "fast-bf16": ("bf16, no checkpointing, 6 x 4, each decoder layer torch.compiled, loss in chunks (fast --load bf16)",
                  ["--recipe", "fast", "--load", "bf16"]),
    "fast": ("ours (RECIPE=fast): the same with the decoder's frozen matmuls in FP8 (e4m3, per-row scales)",
             ["--recipe", "fast"]),
    # Peers, on the same base, data, global batch, lr, seed and LoRA (rank, alpha, targets). Unsloth runs its
    # documented set-ups: LoRA dropout 0 (its fast path) and its own gradient checkpointing.
    "liger": ("fast-bf16 + Liger's kernels (RMSNorm, RoPE, SwiGLU, cross-entropy fused with lm_head)",
              ["--recipe", "fast", "--load", "bf16", "--kernels", "liger"]),
    "unsloth": ("Unsloth 16-bit LoRA as documented: its kernels, its gradient checkpointing, dropout 0",
                ["--recipe", "fast", "--load", "bf16", "--kernels", "unsloth", "--gradient-checkpointing", "on",
                 "--dropout", "0"]),
    "unsloth-no-ckpt": ("the same without gradient checkpointing", ["--recipe", "fast", "--load", "bf16", "--kernels",
                                                                     "unsloth", "--dropout", "0"]),
    "unsloth-fp8": ("Unsloth's FP8 LoRA (load_in_fp8: torchao per-row e4m3 weights), no checkpointing, dropout 0",
                    ["--recipe", "fast", "--kernels", "unsloth", "--load", "fp8", "--dropout", "0"]),
    "unsloth-qlora": ("Unsloth QLoRA as documented: nf4, its gradient checkpointing, dropout 0, paged AdamW 8-bit, 6 x 4",
                      ["--recipe", "seed", "--kernels", "unsloth", "--dropout", "0", "--batch-size", "6",
                       "--grad-accum", "4"]),
}
CPU_VARIANTS = {"cpu": ("plain LoRA on the fp32 base (the CPU demo recipe)", ["--recipe", "cpu"])}
# dense bf16 matrix peak of the GPU, TFLOP/s (vendor datasheets, SXM parts), for the utilisation figure
BF16_PEAK_TFLOPS = {"H100": 989.5, "H200": 989.5, "A100": 312.0}


def flops_per_token(cfg: dict, seq_len: float) -> float:
    """Matrix FLOPs a LoRA training step spends per token: 4 x the parameters of the frozen matmuls (forward, and
    backward to the activations; the frozen weights take no gradient) plus causal attention (QK^T and PV: 2 s d a
    token forward, twice that backward). The LoRA matmuls (r=8) and the embedding lookup are left out."""
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head
    linear = layers * (h * q + 2 * h * kv + q * h + 3 * h * f) + h * cfg["vocab_size"]
    return 4 * linear + 6 * layers * seq_len * q


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=ROOT / "out" / "base" / "smollm2",
                   help="base model folder (with --model 8b-random: the folder that lends its tokenizer)")
    p.add_argument("--dataset", type=Path, default=ROOT / "data" / "grimm_stories.jsonl")
    p.add_argument("--model", choices=["default", "8b-random"], default="default")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (the first is not timed)")
    p.add_argument("--variants", default="", help="comma-separated subset of: " + ", ".join(
        [*GPU_VARIANTS, *CPU_VARIANTS]))
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-train")
    args = p.parse_args()
    import torch
    gpu = torch.cuda.is_available()
    table = {**GPU_VARIANTS, **CPU_VARIANTS}
    names = [v for v in args.variants.split(",") if v] or list(GPU_VARIANTS if gpu else CPU_VARIANTS)
    if unknown := [n for n in names if n not in table]:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(table)}")
    needs = {n: KERNEL_PACKAGES[flags[flags.index("--kernels") + 1]] for n in names
             for flags in [table[n][1]] if "--kernels" in flags}
    missing = {n: pkg for n, pkg in needs.items() if importlib.util.find_spec(pkg) is None}
    if not gpu and any(n in GPU_VARIANTS for n in names):
        raise UserError("all variants but cpu need a CUDA GPU; here only --variants cpu runs")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base = args.base
    if args.model == "8b-random":
        if subprocess.run([sys.executable, str(ROOT / "scripts" / "tools" / "random_model.py"), "--out",
                           str(work / "8b-random"), "--tokenizer", str(args.base)]).returncode != 0:
            raise UserError("random_model.py failed")
        base = work / "8b-random" / "base"
    if not (base / "config.json").exists():
        raise UserError(f"{base / 'config.json'} not found (run 'make base' first, or pass --base)")

    cfg = json.loads((base / "config.json").read_text())
    rows = []
    for name in names:
        what, flags = table[name]
        if name in missing:
            print(f"  {name}: skipped ({missing[name]} is not installed here: pip install {missing[name]})", flush=True)
            rows.append((name, what, f"not installed ({missing[name]})"))
            continue
        out = work / f"run-{name}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(f".{out.name}.resume"), ignore_errors=True)
        cmd = [sys.executable, str(ROOT / "scripts" / "train_lora.py"), "--base", str(base), "--dataset",
               str(args.dataset), "--out", str(out), "--steps", str(args.steps), *flags]
        log(f"{name}: {what}")
        start = time.perf_counter()
        with open(work / f"{name}.log", "w") as logf:
            code = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
            print(f"  {name}: failed ({' '.join(tail)[:160]})", flush=True)
            rows.append((name, what, f"failed: {' '.join(tail)[:100]}"))
            continue
        m = json.loads((out / "metrics.json").read_text())
        targs = json.loads((out / "training_args.json").read_text())
        step_tokens = m["train_tokens"] / m["steps"]
        m["s_per_step"] = step_tokens / m["tokens_per_second"]
        seq = step_tokens / (targs["batch_size"] * targs["grad_accum"])
        m["tflops"] = m["tokens_per_second"] * flops_per_token(cfg, seq) / 1e12
        m["wall"] = time.perf_counter() - start
        rows.append((name, what, m))
        print(f"  {name}: {m['tokens_per_second']:.0f} tokens/s, {m['s_per_step']:.2f} s/step, {m['tflops']:.0f} "
              f"TFLOP/s, peak GPU {m.get('peak_gpu_gib', 0):.1f} GiB, held-out loss {m['eval_loss_before']:.4f} -> "
              f"{m['eval_loss_after']:.4f} ({m['wall']:.0f} s in all)", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    ref = next((m for _, _, m in rows if isinstance(m, dict)), None)
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if gpu and k in device), None)
    print(f"\nfine-tuning {base.name} on {args.dataset.name}, {args.steps} steps per variant, {device}; TFLOP/s "
          f"counts the frozen matmuls and attention (flops_per_token)"
          f"{f', % of the dense bf16 peak of {peak:.0f}' if peak else ''}\n")
    print("| variant | change | tokens/s | s/step | TFLOP/s | peak GPU GiB | held-out loss before -> after (change) | "
          "speed vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for name, what, m in rows:
        if not isinstance(m, dict):
            print(f"| {name} | {what} | {m} | | | | | |")
            continue
        share = f" ({100 * m['tflops'] / peak:.0f}%)" if peak else ""
        print(f"| {name} | {what} | {m['tokens_per_second']:.0f} | {m['s_per_step']:.2f} | {m['tflops']:.0f}{share} | "
              f"{m.get('peak_gpu_gib', 0):.1f} | {m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f} "
              f"({m['eval_loss_after'] - m['eval_loss_before']:+.4f}) | "
              f"{m['tokens_per_second'] / ref['tokens_per_second']:.2f}x |")


if __name__ == "__main__":
    run_main(main)
