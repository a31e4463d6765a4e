#!/usr/bin/env python3
"""Train a LoRA adapter on Grimm tales and write a complete checkpoint folder.

The checkpoint holds the adapter (adapter_config.json + adapter_model.safetensors), the tokenizer with
the chat template it was trained with, the training arguments and the metrics, so `make merge` can use it
as it is. On CPU this is the small demo run `make` does when quantization/checkpoints/ is empty.

Each tale becomes one chat: the user asks for the tale by title, the assistant tells it. Loss is taken
on the assistant's tokens only; the held-out tales (see tales.py) give the eval loss, at the end and every
--eval-every steps. With --save-every N the run state (adapter, optimizer, random generators, data order) is
saved every N steps beside --out; a run that was interrupted resumes from there with the same command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import UserError, atomic_dir, log, run_main  # noqa: E402
from tales import FALLBACK_CHAT_TEMPLATE, chat_messages, load_tales, split_tales  # noqa: E402


def encode(tok, tale: dict, seq_len: int) -> dict:
    """Token ids of one chat and labels that ignore (-100) everything but the assistant's answer.

    The prompt is tokenized on its own and the answer after it, as at serving time (the server tokenizes the
    prompt, the model writes the rest): tokenizing the whole chat at once can merge the prompt's last token
    with the answer's first (a BPE "Assistant: " + "Once" -> " Once")."""
    messages = chat_messages(tale)
    prompt_text = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    full_text = tok.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise UserError("the chat template does not render the prompt as a prefix of the full chat")
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    answer = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    full = (prompt + answer)[:seq_len]
    labels = [-100] * min(len(prompt), len(full)) + full[len(prompt):]
    return {"input_ids": full, "labels": labels}


def collate(batch: list[dict], pad_id: int):
    import torch
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def eval_loss(model, examples: list[dict], pad_id: int, batch_size: int) -> float | None:
    import torch
    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, labels, mask = collate(examples[i:i + batch_size], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    model.train()
    return total / max(count, 1)


RESUME_ARGS = ("base", "dataset", "steps", "batch_size", "seq_len", "lr", "r", "alpha", "dropout",
               "target_modules", "seed")


def resume_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.resume")


def save_state(path: Path, model, optim, step: int, order: list, losses: list, tokens: int, evals: list,
               args) -> None:
    """Everything needed to continue exactly where this step ended, written atomically."""
    import torch
    from peft import get_peft_model_state_dict
    with atomic_dir(path) as tmp:
        torch.save({"adapter": get_peft_model_state_dict(model), "optim": optim.state_dict(), "step": step,
                    "order": order, "losses": losses, "tokens": tokens, "evals": evals,
                    "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(),
                    "args": {k: str(getattr(args, k)) for k in RESUME_ARGS}}, tmp / "state.pt")


def load_state(path: Path, model, optim, args) -> dict | None:
    import torch
    from peft import set_peft_model_state_dict
    if not (path / "state.pt").exists():
        return None
    state = torch.load(path / "state.pt", weights_only=False)
    if state["args"] != {k: str(getattr(args, k)) for k in RESUME_ARGS}:
        raise UserError(f"{path} holds an interrupted run with other settings: remove it to start afresh")
    set_peft_model_state_dict(model, state["adapter"])
    optim.load_state_dict(state["optim"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["py_rng"])
    return state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="base model folder (Hugging Face format)")
    p.add_argument("--dataset", type=Path, required=True, help="JSONL of {\"title\", \"story\"}")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example (longer tales are cut)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: all cores)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out eval loss every N steps (0: end only)")
    p.add_argument("--save-every", type=int, default=0,
                   help="save a resumable state every N steps (0: never); a rerun continues from it")
    args = p.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 16:
        raise UserError("--steps and --batch-size must be >= 1 and --seq-len >= 16")

    tales = load_tales(args.dataset)
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.base)
    if not tok.chat_template:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train_tales, held_tales = split_tales(tales)
    train = [encode(tok, t, args.seq_len) for t in train_tales]
    held = [encode(tok, t, args.seq_len) for t in held_tales]
    log(f"{len(train)} training tales, {len(held)} held out; {args.steps} steps of {args.batch_size} x "
        f"<= {args.seq_len} tokens")

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=args.target_modules.split(","))
    model = get_peft_model(model, lora)
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    start_eval = eval_loss(model, held, pad_id, args.batch_size)

    order: list[int] = []
    losses, tokens, evals, first = [], 0, [], 0
    if state := load_state(resume_dir(args.out), model, optim, args):
        order, losses, tokens, evals, first = (state["order"], state["losses"], state["tokens"], state["evals"],
                                               state["step"])
        log(f"resuming the interrupted run from step {first} ({resume_dir(args.out)})")
    interrupt_at = int(os.environ.get("LORA_SHIP_INTERRUPT_AT_STEP", 0))  # for the resume test
    t0, tokens0 = time.perf_counter(), tokens
    bar = tqdm(range(first, args.steps), desc="training", disable=None, initial=first, total=args.steps)
    for step in bar:
        if len(order) < args.batch_size:
            order += random.sample(range(len(train)), len(train))
        batch = [train[order.pop()] for _ in range(args.batch_size)]
        ids, labels, mask = collate(batch, pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if not math.isfinite(loss.item()):
            raise UserError(f"training loss became {float(loss)} at step {step + 1}: lower --lr")
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(mask.sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{(tokens - tokens0) / (time.perf_counter() - t0):.0f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            evals.append((step + 1, eval_loss(model, held, pad_id, args.batch_size)))
            bar.write(f"step {step + 1}: held-out eval loss {evals[-1][1]}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_state(resume_dir(args.out), model, optim, step + 1, order, losses, tokens, evals, args)
        if step + 1 == interrupt_at:
            raise KeyboardInterrupt
    seconds = time.perf_counter() - t0
    end_eval = eval_loss(model, held, pad_id, args.batch_size)
    metrics = {"steps": args.steps, "train_loss_first": losses[0], "train_loss_last": losses[-1],
               "eval_loss_before": start_eval, "eval_loss_after": end_eval, "eval_history": evals,
               "train_tokens": tokens,
               "seconds": round(seconds, 1), "tokens_per_second": round((tokens - tokens0) / seconds, 1)}
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "training_args.json").write_text(json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(resume_dir(args.out), ignore_errors=True)
    log(f"checkpoint written to {args.out}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval "
        f"{start_eval if start_eval is None else round(start_eval, 3)} -> "
        f"{end_eval if end_eval is None else round(end_eval, 3)}, {seconds:.0f} s")


if __name__ == "__main__":
    run_main(main)
