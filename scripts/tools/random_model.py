#!/usr/bin/env python3
"""Write a random-weight Llama-3.1-8B-shaped base (bf16 safetensors, sharded) and seed-style LoRA adapters.

For benchmarks only (`make bench-merge BENCH_MODEL=8b-random`): the merge and the GGUF conversion cost the
same for random weights as for real ones. Tensors are generated and written one at a time, so this needs
little memory, but 16 GB of disk for the base. The tokenizer is copied from --tokenizer (the converter pads
a smaller vocabulary up to the model's 128256 rows with [PAD] tokens).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/, for lib
from lib.common import UserError, atomic_dir, log, require_free_space, run_main  # noqa: E402
from lib.merge import TOKENIZER_FILES  # noqa: E402

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    "attention_bias": False, "mlp_bias": False, "head_dim": 128, "initializer_range": 0.02,
}


def tensor_plan(cfg: dict) -> list[tuple[str, list[int]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    plan = [("model.embed_tokens.weight", [v, h])]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [(p + "input_layernorm.weight", [h]), (p + "self_attn.q_proj.weight", [h, h]),
                 (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.v_proj.weight", [kv, h]),
                 (p + "self_attn.o_proj.weight", [h, h]), (p + "post_attention_layernorm.weight", [h]),
                 (p + "mlp.gate_proj.weight", [f, h]), (p + "mlp.up_proj.weight", [f, h]),
                 (p + "mlp.down_proj.weight", [h, f])]
    return plan + [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]


def write_base(out: Path, tokenizer: Path, seed: int) -> None:
    import torch
    from tqdm import tqdm

    from lib.tensor_io import ShardedWriter

    plan = tensor_plan(LLAMA_31_8B)
    require_free_space(out.parent, sum(2 * n for n in (s[0] * (s[1] if len(s) > 1 else 1) for _, s in plan)),
                       "the random base")
    gen = torch.Generator().manual_seed(seed)
    with atomic_dir(out) as tmp:
        writer = ShardedWriter(tmp, [(k, torch.bfloat16, s) for k, s in plan], metadata={"lora_ship": "random"})
        for key, shape in tqdm(plan, desc="random base", disable=None):
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            writer.write(key, t)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(LLAMA_31_8B, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (tokenizer / name).exists():
                shutil.copy2(tokenizer / name, tmp / name)


def write_adapter(out: Path, base: Path, seed: int, r: int = 8, alpha: int = 32) -> None:
    """The seed recipe's adapter: r=8, alpha 32 on q_proj and v_proj, B non-zero (as after training)."""
    import torch
    from safetensors.torch import save_file

    cfg = LLAMA_31_8B
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    for i in range(cfg["num_hidden_layers"]):
        for mod, out_f in (("q_proj", cfg["hidden_size"]), ("v_proj", kv)):
            p = f"base_model.model.model.layers.{i}.self_attn.{mod}."
            tensors[p + "lora_A.weight"] = torch.randn(r, cfg["hidden_size"], generator=gen) * 0.01
            tensors[p + "lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    with atomic_dir(out) as tmp:
        save_file(tensors, tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
            "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True}, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder to create: base/ and adapter/ inside")
    p.add_argument("--tokenizer", required=True, type=Path, help="folder with a tokenizer to copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapters", type=int, default=0,
                   help="also write this many adapters (other seeds) as adapters/adapter-0, adapter-1, ...")
    args = p.parse_args()
    if not (args.tokenizer / "tokenizer_config.json").exists():
        raise UserError(f"no tokenizer in {args.tokenizer}")
    if not (args.out / "base" / "config.json").exists():
        log(f"writing a random Llama-3.1-8B-shaped base to {args.out / 'base'}")
        write_base(args.out / "base", args.tokenizer, args.seed)
    write_adapter(args.out / "adapter", args.out / "base", args.seed)
    log(f"wrote {args.out / 'adapter'} (r=8, alpha 32, q_proj + v_proj)")
    for i in range(args.adapters):  # for the adapters mode of bench/serve.py
        write_adapter(args.out / "adapters" / f"adapter-{i}", args.out / "base", args.seed + 100 * (i + 1))
    if args.adapters:
        log(f"wrote {args.adapters} more in {args.out / 'adapters'}")


if __name__ == "__main__":
    run_main(main)
