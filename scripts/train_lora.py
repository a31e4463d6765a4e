#!/usr/bin/env python3
"""Train a LoRA adapter on Grimm tales and write a complete checkpoint folder.

The checkpoint holds the adapter (adapter_config.json + adapter_model.safetensors), the tokenizer with
the chat template it was trained with, the training arguments and the metrics, so `make merge` can use it
as it is. On CPU this is the small demo run `make` does when quantization/checkpoints/ is empty.

Each tale becomes one chat: the user asks for the tale by title, the assistant tells it. Loss is taken
on the assistant's tokens only; the held-out tales (see lib/tales.py) give the eval loss, at the end and every
--eval-every steps. With --save-every N the run state (adapter, optimizer, random generators, data order) is
saved every N steps beside --out; a run that was interrupted resumes from there with the same command.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.chunked_loss import FinalHidden, causal_lm_loss, supports_chunked_loss  # noqa: E402
from lib.common import UserError, atomic_dir, log, run_main  # noqa: E402
from lib.tales import FALLBACK_CHAT_TEMPLATE, chat_messages, load_tales, split_tales  # noqa: E402


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


def eval_loss(model, examples: list[dict], pad_id: int, batch_size: int, device) -> float | None:
    import torch
    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, labels, mask = (t.to(device) for t in collate(examples[i:i + batch_size], pad_id))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    model.train()
    return total / max(count, 1)


RESUME_ARGS = ("base", "dataset", "steps", "batch_size", "grad_accum", "seq_len", "lr", "r", "alpha", "dropout",
               "target_modules", "seed", "load", "optim", "world_size")

# Training set-ups; --recipe picks one (auto: seed on a CUDA GPU, cpu otherwise) and any flag overrides a value.
RECIPES = {
    # plain LoRA on an fp32 model: the small demo run `make` does on a CPU
    "cpu": dict(load="fp32", batch_size=4, grad_accum=1, seq_len=256, lr=2e-4, steps=30, optim="adamw",
                gradient_checkpointing=False, compile=False),
    # the seed's QLoRA (seed 002): nf4 base with double quantization and bf16 compute, paged 8-bit AdamW,
    # gradient checkpointing, the same global batch of 24; faster than the seed's own set-up (make bench-train):
    # the layers compiled, micro-batches of 12, the unquantized parameters left bf16, the loss in chunks
    "seed": dict(load="nf4", batch_size=12, grad_accum=2, seq_len=512, lr=1e-4, steps=500, optim="paged_adamw_8bit",
                 gradient_checkpointing=True, compile=True),
    # the same global batch, lr and LoRA, several times faster where the 16-bit base fits in GPU memory
    # (8B: ~32 GiB): no nf4 dequantization in every matmul, no recomputed forward pass, compiled layers, and
    # the decoder's frozen matmuls in FP8 where the GPU has FP8 tensor cores (bf16 elsewhere; --load bf16)
    "fast": dict(load="fp8", batch_size=6, grad_accum=4, seq_len=512, lr=1e-4, steps=500, optim="adamw",
                 gradient_checkpointing=False, compile=True),
}


# --kernels: the package each choice needs (neither is in requirements: make bench-train's peers)
KERNEL_PACKAGES = {"liger": "liger_kernel", "unsloth": "unsloth"}


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
    state = torch.load(path / "state.pt", weights_only=False, map_location="cpu")
    if state["args"] != {k: str(getattr(args, k)) for k in RESUME_ARGS}:
        raise UserError(f"{path} holds an interrupted run with other settings: remove it to start afresh")
    set_peft_model_state_dict(model, state["adapter"])
    optim.load_state_dict(state["optim"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["py_rng"])
    return state


class Distributed:
    """This process's place in a torchrun launch (WORLD_SIZE, RANK, LOCAL_RANK), or a single process."""

    def __init__(self):
        import torch
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def sum(self, value: float) -> float:
        import torch
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        import torch
        if self.world > 1:
            torch.distributed.barrier()

    def finish(self) -> None:
        """The last step of every process: the others wait until the main one has written the checkpoint, then
        all leave the process group. The wait goes through the launcher's key-value store, not a collective: a
        gloo barrier that the main process completes and tears down at once can leave another process waiting
        forever for its message (seen once in CI: the checkpoint written, torchrun never done)."""
        import torch
        if self.world > 1:
            store = torch.distributed.distributed_c10d._get_default_store()
            if self.main:
                store.set("lora_ship_checkpoint_written", "1")
            else:
                store.wait(["lora_ship_checkpoint_written"])
            torch.distributed.destroy_process_group()


def load_model(args, device):
    """The base in the precision the recipe asks for, with LoRA layers on args.target_modules."""
    import logging

    import torch
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-kernel notice, on import by peft
    if args.kernels == "unsloth":
        return load_model_unsloth(args, device)
    from peft import LoraConfig, get_peft_model
    if args.kernels == "liger":
        # Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, and a cross-entropy fused with lm_head that never
        # materialises the logits) patched into the architecture's modules before they are built
        from liger_kernel.transformers import AutoLigerKernelForCausalLM as AutoModelForCausalLM
    else:
        from transformers import AutoModelForCausalLM

    ckpt_kwargs = {"use_reentrant": False}  # the re-entrant variant breaks DDP and frozen inputs
    if args.load == "nf4":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(args.base, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": device})
        if args.upcast_fp32:
            # PEFT's usual QLoRA preparation (the seed's): every parameter that is not 4-bit in fp32 (the norms,
            # the embeddings, the 128k-row lm_head), so lm_head runs as an fp32 matmul and the residual stream
            # in fp32 between the norms: 1.65x slower and 2.7 GiB more on an 8B (make bench-train, H200)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs=ckpt_kwargs)
    else:
        dtype = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp32": torch.float32}[args.load]
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype).to(device)
    if args.gradient_checkpointing and not (args.load == "nf4" and args.upcast_fp32):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    model.config.use_cache = False
    targets = lora_targets(model, args.target_modules)
    log(f"LoRA on {','.join(targets)}")
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=targets)
    model = get_peft_model(model, lora)
    if args.load == "fp8":
        from lib.fp8_linear import convert_frozen_linears
        count = convert_frozen_linears(model.get_base_model().model.layers)
        log(f"{count} frozen linear layers of the decoder in FP8 (e4m3, per-row scales); lm_head stays bf16")
    if args.compile:
        # regional compilation: the decoder layers are alike, so one compiled graph serves all of them
        for layer in model.get_base_model().model.layers:
            layer.compile()
    model.train()
    return model


def load_model_unsloth(args, device):
    """--kernels unsloth: the base loaded and LoRA-wrapped by Unsloth's FastLanguageModel, its documented set-up
    (its own gradient checkpointing when that is on; it compiles nothing of ours). Benchmark-only."""
    import torch
    from unsloth import FastLanguageModel
    model, _ = FastLanguageModel.from_pretrained(
        str(args.base), max_seq_length=args.seq_len, dtype=torch.bfloat16, load_in_4bit=args.load == "nf4",
        load_in_16bit=args.load == "bf16", device_map={"": device}, use_gradient_checkpointing=False,
        # fp8: its FP8 LoRA (torchao's per-row e4m3 weights, quantized into a cached copy of the base first)
        **({"load_in_fp8": True} if args.load == "fp8" else {}))
    targets = lora_targets(model, args.target_modules)
    log(f"LoRA on {','.join(targets)} (Unsloth)")
    model = FastLanguageModel.get_peft_model(
        model, r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, bias="none", target_modules=targets,
        use_gradient_checkpointing="unsloth" if args.gradient_checkpointing else False, random_state=args.seed)
    model.train()
    return model


def lora_targets(model, spec: str) -> list[str]:
    """--target-modules: a comma-separated list, or auto: PEFT's default for the architecture (q_proj,v_proj for
    Llama, Mistral, Qwen2/3, Gemma), else every linear layer of the attention blocks (Phi-3: qkv_proj,o_proj)."""
    import re

    import torch
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    if spec != "auto":
        return spec.split(",")
    if model.config.model_type in peft_defaults:
        return list(peft_defaults[model.config.model_type])
    found = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and re.search(r"\.(self_attn|attn|attention)\.", name)})
    if not found:
        raise UserError(f"no attention projections found in this {model.config.model_type} model: name the layers "
                        f"with TRAIN_ARGS='--target-modules a,b'")
    return found


def make_optimizer(args, params, device):
    import torch
    # weight decay 0, as the seed's Trainer had it
    if args.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=args.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="base model folder (Hugging Face format)")
    p.add_argument("--dataset", type=Path, required=True, help="JSONL of {\"title\", \"story\"}")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--recipe", choices=["auto", *RECIPES], default="auto",
                   help="default values: seed (QLoRA, seed 002) on a CUDA GPU, cpu otherwise; fast = 16-bit base, "
                        "no gradient checkpointing (needs memory for the 16-bit base), FP8 matmuls where the GPU "
                        "has FP8 tensor cores")
    p.add_argument("--steps", type=int, help="optimizer steps (recipe: cpu 30, seed/fast 500)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch on each device (cpu 4, else 6)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (cpu 1, else 4); with "
                   "NPROC processes each does grad-accum / NPROC of them, so the global batch stays the same")
    p.add_argument("--seq-len", type=int, help="tokens per example, longer tales are cut (cpu 256, else 512)")
    p.add_argument("--lr", type=float, help="learning rate (cpu 2e-4, else 1e-4)")
    p.add_argument("--load", choices=["fp32", "bf16", "fp8", "nf4"], help="precision of the frozen base (recipe: "
                   "cpu fp32, seed nf4, fast fp8 on GPUs of compute capability 8.9+, else bf16); fp8: bf16, with "
                   "the decoder's frozen matmuls in FP8 (lib/fp8_linear.py; on a CPU, torch's slow reference kernel)")
    p.add_argument("--optim", choices=["adamw", "paged_adamw_8bit"])
    p.add_argument("--gradient-checkpointing", choices=["on", "off"])
    p.add_argument("--compile", choices=["on", "off"], help="torch.compile each decoder layer (fast: on)")
    p.add_argument("--upcast-fp32", choices=["on", "off"], default="off",
                   help="nf4 only: PEFT's prepare_model_for_kbit_training, the parameters left unquantized in fp32 "
                        "(the seed's set-up; off: they stay bf16, as the LoRA weights stay fp32 either way)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--target-modules", default="auto", help="comma-separated module names, or auto: PEFT's default "
                   "for the architecture, else every linear layer of the attention blocks (Phi-3: qkv_proj,o_proj)")
    p.add_argument("--chunked-loss", choices=["on", "off"], default="on",
                   help="take the loss from the final hidden states a chunk at a time (lib/chunked_loss.py) instead of "
                        "Transformers' loss over the whole micro-batch's logits (Llama, Mistral, Qwen, Phi-3)")
    p.add_argument("--kernels", choices=["torch", "liger", "unsloth"], default="torch",
                   help="for make bench-train, needs a CUDA GPU and the package (not in requirements): liger = "
                        "Liger's Triton kernels in the model; unsloth = Unsloth's FastLanguageModel (bf16, fp8 or nf4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: all cores)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out eval loss every N steps (0: end only)")
    p.add_argument("--save-every", type=int, default=0,
                   help="save a resumable state every N steps (0: never); a rerun continues from it")
    args = p.parse_args()
    import torch
    if args.recipe == "auto":
        args.recipe = "seed" if torch.cuda.is_available() else "cpu"
    from lib.fp8_linear import has_fp8_tensor_cores
    if args.load is None and RECIPES[args.recipe]["load"] == "fp8" and not has_fp8_tensor_cores():
        args.load = "bf16"  # FP8 products are only fast on FP8 tensor cores (the CPU's reference kernel is slow)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("gradient_checkpointing", "compile", "upcast_fp32", "chunked_loss"):
        if isinstance(getattr(args, key), str):
            setattr(args, key, getattr(args, key) == "on")
    if args.steps < 1 or args.batch_size < 1 or args.grad_accum < 1 or args.seq_len < 16:
        raise UserError("--steps, --batch-size and --grad-accum must be >= 1 and --seq-len >= 16")
    if args.load == "nf4" and not torch.cuda.is_available():
        raise UserError("--load nf4 (the seed recipe) needs a CUDA GPU; on CPU use --recipe cpu")
    if args.load == "fp8" and torch.cuda.is_available() and not has_fp8_tensor_cores():
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        raise UserError(f"--load fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); "
                        f"this {torch.cuda.get_device_name()} is {capability}: use --load bf16")
    if args.kernels != "torch":
        import importlib.util
        package = KERNEL_PACKAGES[args.kernels]
        if not torch.cuda.is_available():
            raise UserError(f"--kernels {args.kernels} needs a CUDA GPU")
        if importlib.util.find_spec(package) is None:
            raise UserError(f"--kernels {args.kernels} needs the {package} package: pip install {package}")
        if args.kernels == "unsloth":
            if args.load == "fp32":
                raise UserError("--kernels unsloth loads the base in bf16, fp8 or nf4, not fp32")
            args.compile = False  # Unsloth brings its own kernels and compiles what it patches
    return args


def main() -> None:
    args = parse_args()
    tales = load_tales(args.dataset)
    if args.kernels == "unsloth":
        import importlib
        importlib.import_module("unsloth")  # before transformers: it patches transformers' classes on import
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    dist = Distributed()
    args.world_size = dist.world
    if args.grad_accum % dist.world:
        raise UserError(f"--grad-accum {args.grad_accum} must be a multiple of the number of processes ({dist.world})")
    accum = args.grad_accum // dist.world  # micro-batches per process and step
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
    if any(all(x == -100 for x in ex["labels"]) for ex in train + held):
        raise UserError(f"--seq-len {args.seq_len} leaves no room for the answer after the prompt: raise it")
    global_batch = args.batch_size * args.grad_accum
    if dist.main:
        log(f"recipe {args.recipe}: {args.load} base, {args.optim}, gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'}; {len(train)} training tales, {len(held)} held out; "
            f"{args.steps} steps of {global_batch} x <= {args.seq_len} tokens ({dist.world} process(es) x "
            f"{accum} x {args.batch_size}) on {dist.device.type}")

    model = load_model(args, dist.device)
    optim = make_optimizer(args, [p for p in model.parameters() if p.requires_grad], dist.device)
    ddp = None
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        # broadcast_buffers off: the only buffers are frozen (rotary tables, FP8 weights), the same on every rank
        ddp = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                      broadcast_buffers=False)
    start_eval = eval_loss(model, held, pad_id, args.batch_size, dist.device) if dist.main else None
    # the loss from the final hidden states in chunks (lib/chunked_loss.py), where the logits are a plain lm_head;
    # Liger and Unsloth bring their own fused loss
    final_hidden = (FinalHidden(model) if args.chunked_loss and args.kernels == "torch" and supports_chunked_loss(model)
                    else None)

    order: list[int] = []
    losses, tokens, evals, first = [], 0, [], 0
    if state := load_state(resume_dir(args.out), model, optim, args):
        order, losses, tokens, evals, first = (state["order"], state["losses"], state["tokens"], state["evals"],
                                               state["step"])
        if dist.main:
            log(f"resuming the interrupted run from step {first} ({resume_dir(args.out)})")
    interrupt_at = int(os.environ.get("LORA_SHIP_INTERRUPT_AT_STEP", 0))  # for the resume test
    t0, tokens0, steady = time.perf_counter(), tokens, None  # steady: (time, tokens) after the first step
    step_times = [t0]
    bar = tqdm(range(first, args.steps), desc="training", disable=None if dist.main else True, initial=first,
               total=args.steps)
    for step in bar:
        while len(order) < global_batch:  # a dataset smaller than the global batch repeats within a step
            order += random.sample(range(len(train)), len(train))
        batch = [train[order.pop()] for _ in range(global_batch)]
        # Every process draws the same global batch and takes its share; each micro-batch's summed loss is
        # divided by the global batch's label count, so N processes make exactly the one-process gradient.
        label_count = sum(sum(1 for x in b["labels"][1:] if x != -100) for b in batch)
        mine = batch[dist.rank * accum * args.batch_size:(dist.rank + 1) * accum * args.batch_size]
        step_loss = torch.zeros((), device=dist.device)
        for i in range(accum):
            ids, labels, mask = collate(mine[i * args.batch_size:(i + 1) * args.batch_size], pad_id)
            # no padding: no mask, so attention takes its causal fast path (checked on the CPU: no GPU sync)
            mask = None if bool(mask.all()) else mask.to(dist.device)
            ids, labels = ids.to(dist.device), labels.to(dist.device)
            sync = ddp is None or i == accum - 1
            with (ddp.no_sync() if not sync else contextlib.nullcontext()):
                if final_hidden:
                    (ddp or model)(input_ids=ids, attention_mask=mask, logits_to_keep=1)
                    loss = causal_lm_loss(final_hidden.take(), model.get_output_embeddings(), labels, label_count)
                else:
                    loss = (ddp or model)(input_ids=ids, attention_mask=mask, labels=labels,
                                          num_items_in_batch=label_count).loss
                (loss * dist.world).backward()  # DDP averages over processes; the loss is already global
            step_loss += loss.detach()
        step_loss = dist.sum(step_loss.item())  # one GPU sync per step, not per micro-batch
        if not math.isfinite(step_loss):
            raise UserError(f"training loss became {step_loss} at step {step + 1}: lower --lr")
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(step_loss)
        tokens += sum(len(b["input_ids"]) for b in batch)
        step_times.append(time.perf_counter())
        if step == first:
            steady = (step_times[-1], tokens)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{(tokens - tokens0) / (time.perf_counter() - t0):.0f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            if dist.main:
                evals.append((step + 1, eval_loss(model, held, pad_id, args.batch_size, dist.device)))
                bar.write(f"step {step + 1}: held-out eval loss {evals[-1][1]}")
            dist.barrier()
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps and dist.main:
            save_state(resume_dir(args.out), model, optim, step + 1, order, losses, tokens, evals, args)
        if step + 1 == interrupt_at:
            raise KeyboardInterrupt
    seconds = time.perf_counter() - t0
    # tokens/s of the steps after the first (which pays for CUDA start-up and kernel selection)
    if steady is None or tokens == steady[1]:
        steady = (t0, tokens0)
    rate = (tokens - steady[1]) / (time.perf_counter() - steady[0])
    if not dist.main:
        dist.finish()
        return
    end_eval = eval_loss(model, held, pad_id, args.batch_size, dist.device)
    metrics = {"recipe": args.recipe, "steps": args.steps, "train_loss_first": losses[0],
               "train_loss_last": losses[-1], "train_losses": losses,
               "eval_loss_before": start_eval, "eval_loss_after": end_eval, "eval_history": evals,
               "train_tokens": tokens, "processes": dist.world,
               "seconds": round(seconds, 1), "tokens_per_second": round(rate, 1),
               "step_seconds": [round(b - a, 3) for a, b in zip(step_times, step_times[1:])]}
    if dist.device.type == "cuda":
        metrics["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(dist.device) / 2**30, 2)
        metrics["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(dist.device) / 2**30, 2)
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "training_args.json").write_text(json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(resume_dir(args.out), ignore_errors=True)
    log(f"checkpoint written to {args.out}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval "
        f"{start_eval if start_eval is None else round(start_eval, 3)} -> "
        f"{end_eval if end_eval is None else round(end_eval, 3)}, {seconds:.0f} s, {rate:.0f} tokens/s")
    dist.finish()


if __name__ == "__main__":
    run_main(main)
