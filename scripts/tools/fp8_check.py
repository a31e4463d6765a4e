#!/usr/bin/env python3
"""How much FP8 training (train_lora.py --load fp8) changes a real base, and whether its adapters are as good.

1. The base's next-token distributions with the decoder's frozen matmuls in FP8 (lib/fp8_linear.py) against
   bf16, over the answer tokens of the held-out tales and the first training tales: mean and p99 KL, top-1
   agreement, loss under each.
2. For each checkpoint given: its loss on the held-out tales with the adapter on the bf16 base, the way it is
   merged and served. Train one checkpoint with --load fp8 and one with --load bf16 (same seed) and compare.
Runs on the CPU (torch's reference FP8 kernel) or a GPU.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/, for lib and train_lora
from lib.checkpoints import validate  # noqa: E402
from lib.common import UserError, log, require_base, run_main  # noqa: E402
from lib.tales import load_tales, split_tales  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="base model folder (Hugging Face format)")
    p.add_argument("--dataset", type=Path, required=True, help="JSONL of {\"title\", \"story\"}")
    p.add_argument("--checkpoints", type=Path, nargs="*", default=[], help="adapter folders to score on bf16")
    p.add_argument("--train-tales", type=int, default=4, help="training tales scored beside the held-out ones")
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()
    require_base(args.base)
    for ckpt in args.checkpoints:
        if not ckpt.is_dir():
            raise UserError(f"checkpoint {ckpt}: no such folder")
    checkpoints = [validate(ckpt) for ckpt in args.checkpoints]
    tales = load_tales(args.dataset)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.fp8_linear import convert_frozen_linears
    from train_lora import collate, encode

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(args.base)
    train, held = split_tales(tales)
    examples = [encode(tok, t, args.seq_len) for t in held + train[:args.train_tales]]
    ids, labels, mask = collate(examples, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    scored = labels[:, 1:] != -100
    targets = labels[:, 1:].clamp_min(0)

    def log_probs(model) -> torch.Tensor:
        model.to(device).eval()
        with torch.no_grad():
            return torch.cat([model(input_ids=ids[i:i + 1].to(device), attention_mask=mask[i:i + 1].to(device))
                              .logits[:, :-1].float().log_softmax(-1).cpu() for i in range(len(ids))])

    def loss(lp: torch.Tensor, rows: int | None = None) -> float:
        return float(-lp.gather(-1, targets[..., None]).squeeze(-1)[:rows][scored[:rows]].mean())

    def load_bf16():
        return AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)

    base = load_bf16()
    ref = log_probs(base)
    fp8 = copy.deepcopy(base).requires_grad_(False)
    convert_frozen_linears(fp8.model.layers)
    got = log_probs(fp8)
    kl = (ref.exp() * (ref - got)).sum(-1)[scored]
    agree = float((ref.argmax(-1) == got.argmax(-1))[scored].float().mean())
    print(f"base, {int(scored.sum())} answer tokens ({len(held)} held-out tales + {args.train_tales} training): "
          f"loss bf16 {loss(ref):.4f}, FP8 {loss(got):.4f}; KL(bf16 || FP8) mean {kl.mean():.4f}, "
          f"p99 {kl.quantile(0.99):.4f} nats; top-1 agreement {agree:.1%}", flush=True)
    del base, fp8
    for ckpt in checkpoints:
        log(f"scoring {ckpt} on the bf16 base")
        lp = log_probs(PeftModel.from_pretrained(load_bf16(), ckpt))
        print(f"{ckpt}: held-out loss {loss(lp, len(held)):.4f} on the bf16 base (base alone: "
              f"{loss(ref, len(held)):.4f})", flush=True)


if __name__ == "__main__":
    run_main(main)
