#!/usr/bin/env python3
"""What merging and quantizing cost: perplexity and agreement with the 16-bit merged model, per format.

On the held-out Grimm tales (the same split training uses), cut to --max-tokens and scored the way llama.cpp's
llama-perplexity does it: chunks of --ctx tokens, each scored on its second half. Forms:
  Transformers: base, base + adapter (PEFT, unmerged), merged (the 16-bit reference), nf4 and int8 loads
  llama.cpp:    GGUF f16 and --quants (q8_0, Q4_K_M; also with an importance matrix over the training split,
                and per-tensor plans) (llama-perplexity; KL and top-1 against the f16 GGUF's logits)
Transformers forms are compared with the merged model on its own tokens; GGUF forms with the f16 GGUF, which
is the same 16-bit merged model run by llama.cpp. Writes report.md, quality.png and quality.json to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import ROOT, UserError, add_checkpoint_args, atomic_file, log, run_main  # noqa: E402
from lib.common import run_tool  # noqa: E402


def held_out_text(dataset: Path) -> str:
    from lib.tales import load_tales, split_tales
    _, held = split_tales(load_tales(dataset))
    if not held:
        raise UserError(f"{dataset} has no held-out tales to evaluate on")
    return "\n\n".join(f"{t['title']}\n\n{t['story']}" for t in held)


class Scorer:
    """Next-token log-probabilities of a Transformers model over the chunks, and their comparison."""

    def __init__(self, ids: list[int], ctx: int):
        self.chunks = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]
        self.first = ctx // 2
        self.reference: list = []

    def logprobs(self, model):
        import torch
        with torch.no_grad():
            for chunk in self.chunks:
                logits = model(torch.tensor([chunk])).logits[0, self.first:-1].float()
                yield torch.log_softmax(logits, dim=-1), torch.tensor(chunk[self.first + 1:])

    def score(self, model, keep_as_reference: bool = False) -> dict:
        import torch
        nll, kl, same, n = 0.0, 0.0, 0, 0
        for i, (lp, targets) in enumerate(self.logprobs(model)):
            nll += -lp.gather(1, targets[:, None]).sum().item()
            if keep_as_reference:
                self.reference.append(lp)
            elif self.reference:
                ref = self.reference[i]
                kl += (ref.exp() * (ref - lp)).sum().item()
                same += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
            n += len(targets)
        out = {"ppl": float(torch.tensor(nll / n).exp()), "tokens": n}
        if self.reference and not keep_as_reference:
            out.update(kl=kl / n, top1=same / n)
        return out


def parse_perplexity(text: str) -> dict:
    """PPL (and, with --kl-divergence, mean KL and 'same top p') from llama-perplexity's output."""
    out = {}
    if m := re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", text) or re.search(r"Final estimate: PPL = ([\d.]+)", text):
        out["ppl"] = float(m.group(1))
    if m := re.search(r"Mean\s+KLD:\s*([-\d.e]+)", text):
        out["kl"] = float(m.group(1))
    if m := re.search(r"Same top p:\s*([\d.]+)", text):
        out["top1"] = float(m.group(1)) / 100
    if "ppl" not in out:
        raise UserError("could not read llama-perplexity's result (see the eval log)")
    return out


def gguf_forms(args, ckpt: Path, text_file: Path, work: Path, n_chunks: int, logpath: Path) -> dict:
    """f16 (the reference) and each of --quants: converter types written by merge_gguf.py, llama-quantize types
    quantized from the f16 GGUF (NAME:imatrix with the importance matrix of the training split)."""
    from lib.imatrix import calibration_file, choose_calibration, compute
    from lib.quant_plan import plan_table, quantize_with_plan
    from lib.quants import CONVERTER_TYPES, PLAN_TYPES, quant_key

    bin_dir = args.llama_cpp / "build" / "bin"
    py, scripts = sys.executable, ROOT / "scripts"
    forms = {"f16": work / "model.f16.gguf"}
    for spec in args.quants.split(","):
        quant, _, how = spec.strip().partition(":")
        if how not in ("", "imatrix"):
            raise UserError(f"--quants {spec}: write TYPE or TYPE:imatrix")
        key = quant_key(quant)
        forms[f"{key} imatrix" if how else key] = work / f"model.{key}{'.imatrix' if how else ''}.gguf"
    imatrix, plans, table = None, {}, None
    for name, path in forms.items():
        key, _, how = name.partition(" ")
        if key in CONVERTER_TYPES:
            log(f"GGUF {key} ...")
            run_tool([py, scripts / "merge_gguf.py", "--base", args.base, "--checkpoint", ckpt.resolve(), "--quant",
                      key, "--out", path, "--llama-cpp", args.llama_cpp], f"merge_gguf.py --quant {key}", logpath)
            continue
        if (how or key in PLAN_TYPES) and imatrix is None:
            start = time.perf_counter()
            calib = choose_calibration(None, args.dataset, ckpt)
            imatrix = compute(forms["f16"], calib, work / "imatrix", bin_dir / "llama-imatrix", logpath,
                              args.imatrix_chunks)
            calibration = calibration_file(calib, work / "imatrix")
            log(f"importance matrix ready in {time.perf_counter() - start:.1f} s")
        log(f"GGUF {name} ...")
        start = time.perf_counter()
        if key in PLAN_TYPES:
            table = table or plan_table(forms["f16"], imatrix, calibration, bin_dir, work / "plan", logpath)
            plans[name] = quantize_with_plan(forms["f16"], path, key, imatrix, calibration, bin_dir, logpath, table)
        else:
            run_tool([bin_dir / "llama-quantize", *(["--imatrix", imatrix] if how else []), forms["f16"], path, key],
                     "llama-quantize", logpath)
        log(f"GGUF {name} in {time.perf_counter() - start:.1f} s")
    common = ["-f", text_file, "--ctx-size", args.ctx, "--chunks", n_chunks, "--batch-size", args.ctx,
              "--threads", os.cpu_count() or 1]
    kld = work / "f16.kld"
    results = {}
    for name, path in forms.items():
        log(f"llama-perplexity on {name} ...")
        extra = ["--kl-divergence-base", kld] + (["--kl-divergence"] if name != "f16" else [])
        out = parse_perplexity(run_tool([bin_dir / "llama-perplexity", "-m", path, *common, *extra],
                                        f"llama-perplexity on {name}", logpath))
        results[f"GGUF {name}"] = {**out, "engine": "llama.cpp", "bytes": path.stat().st_size}
        if name in plans:
            results[f"GGUF {name}"]["plan"] = plans[name]["types"]
    kld.unlink(missing_ok=True)
    return results


def hf_forms(args, ckpt: Path, ids: list[int], logpath: Path) -> dict:
    from lib.loading import load

    merged = args.out / "merged"
    log("merging (Transformers reference) ...")
    run_tool([sys.executable, ROOT / "scripts" / "merge_lora.py", "--base", args.base, "--checkpoint", ckpt.resolve(),
         "--out", merged], "merge_lora.py", logpath)
    scorer = Scorer(ids, args.ctx)
    forms = [("HF merged 16-bit (reference)", merged, None, "16bit"), ("HF base", args.base, None, "16bit"),
             ("HF base + adapter (unmerged)", args.base, ckpt, "16bit"), ("HF merged nf4", merged, None, "nf4"),
             ("HF merged int8", merged, None, "int8")]
    results = {}
    for name, folder, adapter, mode in forms:
        log(f"{name} ...")
        model, _ = load(folder, adapter, mode)
        if mode == "16bit":
            model = model.float()  # 16-bit weights, computed in fp32: the most exact view of the 16-bit model
        size = model.get_memory_footprint() if mode != "16bit" else sum(
            p.numel() * 2 for p in model.parameters())
        results[name] = {**scorer.score(model, keep_as_reference=name.endswith("(reference)")),
                         "engine": "transformers", "bytes": size}
        del model
    return results


def report(results: dict, out: Path, meta: str) -> str:
    lines = [f"Held-out Grimm tales, {meta}.", "",
             "| form | engine | size MiB | perplexity | KL vs 16-bit merged (nats) | top-1 agreement |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        kl = "reference" if "reference" in name or name == "GGUF f16" else (
            f"{r['kl']:.6f}" if "kl" in r else "-")
        top1 = f"{r['top1'] * 100:.2f}%" if "top1" in r else "-"
        lines.append(f"| {name} | {r['engine']} | {r['bytes'] / 2**20:.1f} | {r['ppl']:.4f} | {kl} | {top1} |")
    lines += ["", "Transformers forms are compared with the HF merged model; GGUF forms with the GGUF f16 "
              "(the same merged model in llama.cpp). Merged vs unmerged must be ~0: it proves the merge."]
    text = "\n".join(lines) + "\n"
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(text)
    with atomic_file(out / "quality.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    chart(results, out / "quality.png")
    return text


def chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    left.barh(names, [results[n]["ppl"] for n in names], color=["C0" if "HF" in n else "C1" for n in names])
    left.set_xlabel("perplexity on held-out tales (lower is better)")
    left.invert_yaxis()
    # labels of forms of about one size and KL would overprint: each goes at least a line (`line` decades) above
    # the last label near it (within a label's width, about 35 MiB here), with a thin line to its point
    points = [(results[n]["bytes"] / 2**20, max(results[n]["kl"], 1e-7), n) for n in names if "kl" in results[n]]
    line, labels = 0.17, []  # (MiB, log10 of the label's height)
    for mib, kl, n in sorted(points, key=lambda p: p[1]):
        right.scatter(mib, kl, color="C0" if "HF" in n else "C1")
        at = max([y + line for x, y in labels if abs(x - mib) < 35 and y > math.log10(kl) - line],
                 default=math.log10(kl))
        labels.append((mib, at))
        moved = at > math.log10(kl) + 1e-9
        right.annotate(n, (mib, kl), xytext=(mib + 2, 10 ** at), fontsize=8, va="center",
                       arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"} if moved else None)
    right.set_yscale("log")
    right.set_xlabel("size (MiB)")
    right.set_ylabel("mean KL vs 16-bit merged (nats, log)")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="base model folder (Hugging Face format)")
    add_checkpoint_args(p, ROOT / "quantization" / "checkpoints")
    p.add_argument("--dataset", type=Path, default=ROOT / "data" / "grimm_stories.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "eval", help="folder for the report and models")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens to score (default: %(default)s)")
    p.add_argument("--llama-cpp", type=Path, default=ROOT / "vendor" / "llama.cpp")
    p.add_argument("--quants", default="q8_0,Q4_K_M", help="GGUF forms besides f16, comma-separated: "
                   "a QUANT type, TYPE:imatrix with the importance matrix of --dataset's training split, "
                   "Q4_K_M+ (a per-tensor plan at Q4_K_M's size, with it); docs/quality.md's table: "
                   "q8_0,Q3_K_M,Q3_K_M:imatrix,Q3_K_M+,Q4_K_M,Q4_K_M:imatrix,Q4_K_M+,Q5_K_M,Q5_K_M:imatrix,"
                   "IQ4_XS:imatrix (default: %(default)s)")
    p.add_argument("--imatrix-chunks", type=int, default=48, help="calibration chunks (default: %(default)s)")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from lib.checkpoints import select_checkpoint

    if not (args.llama_cpp / "build" / "bin" / "llama-perplexity").exists():
        raise UserError("llama-perplexity not found: run 'make vendor' first")
    ckpt = select_checkpoint(args.checkpoints_dir, args.checkpoint, args.fallback)
    args.out.mkdir(parents=True, exist_ok=True)
    logpath = args.out / "eval.log"
    logpath.write_text("")
    tok = AutoTokenizer.from_pretrained(ckpt if (ckpt / "tokenizer_config.json").exists() else args.base)
    ids = tok(held_out_text(args.dataset), add_special_tokens=True)["input_ids"][:args.max_tokens]
    n_chunks = len(ids) // args.ctx
    if n_chunks < 1:
        raise UserError(f"the held-out tales give {len(ids)} tokens, fewer than one chunk of --ctx {args.ctx}")
    ids = ids[:n_chunks * args.ctx]
    text_file = args.out / "held_out.txt"
    text_file.write_text(tok.decode(ids, skip_special_tokens=True))
    start = time.perf_counter()
    results = hf_forms(args, ckpt, ids, logpath)
    results.update(gguf_forms(args, ckpt, text_file, args.out, n_chunks, logpath))
    meta = (f"{n_chunks} chunks of {args.ctx} tokens, each scored on its second half; base {args.base.name}, "
            f"checkpoint {ckpt.name}")
    print("\n" + report(results, args.out, meta))
    log(f"wrote {args.out / 'report.md'} and {args.out / 'quality.png'} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
