#!/usr/bin/env python3
"""Merge a LoRA checkpoint into its base model and write a full Hugging Face model (safetensors).

The default method streams: it reads one base tensor at a time, adds the adapter's delta in float32
(PEFT's formula: scaling · B @ A, rsLoRA, DoRA, rank/alpha patterns, fan_in_fan_out, embeddings,
modules_to_save and resized vocabularies in each layout PEFT saves, trainable tokens) and writes it straight
out, so memory stays near the size of the largest tensor. `--method peft` runs PEFT's own `merge_and_unload`
instead (the reference).

Checkpoint selection: the one folder in --checkpoints-dir, or --checkpoint NAME; a Trainer checkpoint
(checkpoint-500/ with optimizer state beside the adapter) is fine, and a Trainer output folder holding
checkpoint-N/ folders gives its latest one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import (  # noqa: E402
    add_checkpoint_args, atomic_dir, human_bytes, log, require_base, require_free_space, run_main)
from lib.merge import (  # noqa: E402
    MergedSource, check_adapter_config, check_tokenizer, copy_side_files, provenance, tokenizer_source, write_side_files)


def merge_streaming(base_dir: Path, ckpt: Path, out: Path, out_dtype_name: str) -> dict:
    from tqdm import tqdm

    from lib.tensor_io import ShardedWriter, tensor_bytes

    source = MergedSource(base_dir, ckpt, out_dtype_name)
    require_free_space(out.parent, sum(tensor_bytes(d, s) for _, d, s in source.plan), "the merged model")
    with atomic_dir(out) as tmp:
        writer = ShardedWriter(tmp, source.plan, metadata={"lora_ship": "merged"})
        bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="merging", disable=None)
        for key, dtype, shape in source.plan:
            writer.write(key, source.tensor(key))
            bar.update(tensor_bytes(dtype, shape))
        writer.close()
        bar.close()
        write_side_files(source, tmp, "streaming")
    return source.provenance("streaming")


def merge_peft(base_dir: Path, ckpt: Path, out: Path, out_dtype_name: str) -> dict:
    """The reference: PEFT's merge_and_unload on the whole model in memory, then save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lib.checkpoints import read_adapter_config

    cfg = read_adapter_config(ckpt)
    check_adapter_config(cfg)
    check_tokenizer(tokenizer_source(base_dir, ckpt), json.loads((base_dir / "config.json").read_text()))
    dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[out_dtype_name]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model = PeftModel.from_pretrained(model, ckpt).merge_and_unload()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_side_files(base_dir, ckpt, tmp)
        info = provenance(base_dir, ckpt, cfg, "peft", None, None)
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="base model folder (Hugging Face format)")
    add_checkpoint_args(p, Path("quantization/checkpoints"))
    p.add_argument("--out", required=True, type=Path, help="output folder for the merged model")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="dtype of the merged weights (default: the base's)")
    p.add_argument("--method", choices=["streaming", "peft"], default="streaming",
                   help="streaming (low memory, default) or peft (PEFT merge_and_unload, the reference)")
    args = p.parse_args()

    from lib.checkpoints import select_checkpoint

    require_base(args.base)
    ckpt = select_checkpoint(args.checkpoints_dir, args.checkpoint, args.fallback)
    log(f"merging {ckpt} into {args.base} ({args.method})")
    start = time.perf_counter()
    merge = merge_streaming if args.method == "streaming" else merge_peft
    merge(args.base, ckpt, args.out, args.dtype)
    from lib.common import dir_size
    log(f"wrote {args.out} ({human_bytes(dir_size(args.out))}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_main(main)
