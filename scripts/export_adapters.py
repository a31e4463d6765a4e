#!/usr/bin/env python3
"""Each LoRA checkpoint as a GGUF adapter file that llama.cpp applies unmerged: many fine-tunes, one base.

Every checkpoint folder in --checkpoints-dir (or the one --checkpoint names) becomes --out-dir/NAME.gguf, NAME
being the folder's name: `make serve-adapters` serves the base once with all of them, and a request chooses one
by "model": NAME. The files also work with a stock `llama-server -m base.gguf --lora NAME.gguf` and with
Ollama's `ADAPTER ./NAME.gguf` on the same base.

The adapter is read as the merge reads it (lib/merge.py: PEFT's layouts, the fit to the base), written as a
plain PEFT adapter with its scale (alpha / r, rsLoRA, rank and alpha patterns) folded into B, and converted by
llama.cpp's own convert_lora_to_gguf.py, which applies each architecture's tensor names and permutations.
What llama.cpp cannot apply unmerged (DoRA, modules_to_save, a resized vocabulary, trainable tokens, LoRA on
the embedding, fan_in_fan_out layers) is named, one line per adapter, and the others still go on.
An adapter file newer than its checkpoint and the base is kept; one whose checkpoint is gone is removed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import ROOT, UserError, atomic_file, human_bytes, log, require_base, run_main, run_tool  # noqa: E402

OUTTYPES = ("f16", "bf16", "f32", "q8_0")


class CannotUnmerge(UserError):
    """It fits the base, but llama.cpp cannot apply it unmerged: served merged, it works."""


class DoesNotFit(UserError):
    """Its shapes or layers do not fit the base."""


def served_name(ckpt_folder: Path) -> str:
    return ckpt_folder.name


def unmerged_blocker(pairs: dict, replace: dict, cfg: dict) -> str | None:
    """Why llama.cpp could not apply this adapter unmerged (None when it can): it adds B·A·x per layer, nothing
    else."""
    if replace:
        return f"it replaces whole tensors ({', '.join(sorted(replace)[:3])}: modules_to_save or a resized vocabulary)"
    for module, parts in sorted(pairs.items()):
        if "tokens" in parts:
            return f"it trains token rows of {module} (trainable tokens)"
        if "magnitude" in parts:
            return f"it is DoRA ({module} has a magnitude vector)"
        if "emb_A" in parts:
            return f"it puts LoRA on the embedding layer {module}"
    if cfg.get("fan_in_fan_out"):
        return "its layers are fan_in_fan_out (Conv1D)"
    return None


def peft_folder(ckpt: Path, base: Path, dest: Path) -> int:
    """Write `ckpt` into dest as a plain PEFT adapter whose B carries the whole scale (lora_alpha 0: llama.cpp
    then scales by 1); return the number of LoRA modules. UserError when it does not fit `base` or cannot be
    served unmerged."""
    import torch
    from safetensors.torch import save_file

    from lib.checkpoints import read_adapter_config, read_adapter_weights
    from lib.lora_math import LoraConfig
    from lib.merge import PREFIX, parse_adapter, plan_merge
    from lib.tensor_io import CheckpointReader

    cfg = read_adapter_config(ckpt)
    pairs, replace = parse_adapter(read_adapter_weights(ckpt), cfg)
    base_cfg = json.loads((base / "config.json").read_text())
    try:
        plan_merge(CheckpointReader(base), pairs, replace, cfg, base_cfg, None)  # the fit, as the merge checks it
    except UserError as e:
        raise DoesNotFit(str(e)) from None
    if reason := unmerged_blocker(pairs, replace, cfg):
        raise CannotUnmerge(f"llama.cpp cannot apply it unmerged: {reason}")
    if not pairs:
        raise UserError("it holds no LoRA matrices")
    lora = LoraConfig.from_dict(cfg)
    tensors = {}
    for module, parts in pairs.items():
        a, b = parts["A"].float(), parts["B"].float() * lora.scaling(module)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise UserError(f"its LoRA matrices of {module} have non-finite values (inf/NaN)")
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(dest / "adapter_model.safetensors"))
    ranks = {p["A"].shape[0] for p in pairs.values()}
    (dest / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": max(ranks), "lora_alpha": 0, "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in pairs})}, indent=2) + "\n")
    return len(pairs)


def export(ckpt: Path, base: Path, out: Path, outtype: str, llama_cpp: Path, logpath: Path) -> int:
    """One checkpoint to out (written under a temporary name); the number of LoRA modules."""
    converter = llama_cpp / "convert_lora_to_gguf.py"
    if not converter.exists():
        raise UserError(f"{converter} not found: run 'make vendor' first")
    with tempfile.TemporaryDirectory(prefix=".adapter-stage-", dir=out.parent) as stage:
        n = peft_folder(ckpt, base, Path(stage))
        with atomic_file(out) as tmp:
            run_tool([sys.executable, converter, "--base", base, "--outtype", outtype, "--outfile", tmp, stage],
                     f"convert_lora_to_gguf.py on {ckpt}", logpath)
    return n


def up_to_date(out: Path, ckpt: Path, base: Path) -> bool:
    inputs = [p for p in ckpt.iterdir() if p.is_file()] + [base / "config.json", Path(__file__)]
    return out.exists() and out.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


def checkpoints(folder: Path, name: str | None, fallback: Path | None) -> dict[str, Path]:
    """served name -> checkpoint folder, as found (main() validates each: a Trainer output folder gives its
    latest checkpoint)."""
    from lib.checkpoints import candidates, select_checkpoint, validate

    if name:
        ckpt = select_checkpoint(folder, name)
        return {served_name(Path(name)): ckpt}
    found = candidates(folder) if folder.is_dir() else []
    if not found and fallback is not None:
        return {served_name(Path(fallback)): validate(Path(fallback))}
    if not found:
        raise UserError(f"no checkpoint in {folder}: copy your adapter folders (adapter_config.json + "
                        f"adapter_model.safetensors) there")
    if found == [folder]:  # the folder is itself one checkpoint
        return {served_name(folder): folder}
    return {served_name(p): p for p in found}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="base model folder (Hugging Face format)")
    p.add_argument("--checkpoints-dir", type=Path, default=ROOT / "quantization" / "checkpoints",
                   help="folder of checkpoint folders (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help="only this checkpoint (a name inside --checkpoints-dir, or a path)")
    p.add_argument("--fallback", type=Path, default=None, help="checkpoint to use when --checkpoints-dir is empty")
    p.add_argument("--out-dir", required=True, type=Path, help="where NAME.gguf go")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16", help="adapter tensor type (default: %(default)s)")
    p.add_argument("--base-name", default=None, help="the name the base is served under (no adapter may take it)")
    p.add_argument("--llama-cpp", type=Path, default=ROOT / "vendor" / "llama.cpp", help="llama.cpp folder")
    p.add_argument("--log", type=Path, default=ROOT / "out" / "logs" / "convert.log", help="converter log")
    args = p.parse_args()

    from lib.checkpoints import read_adapter_config, validate
    from lib.merge import recorded_base_differs

    require_base(args.base)
    found = checkpoints(args.checkpoints_dir, args.checkpoint, args.fallback)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    done, skipped = [], []
    for name, ckpt in found.items():
        out = args.out_dir / f"{name}.gguf"
        if name == args.base_name:
            skipped.append(name)
            print(f"{name}: skipped: the base is served under that name; rename the checkpoint folder",
                  file=sys.stderr)
            continue
        recorded = None
        try:
            ckpt = validate(ckpt)  # a Trainer output folder: its latest checkpoint-N (said on stderr)
            cfg = read_adapter_config(ckpt)
            if warning := recorded_base_differs(cfg, args.base):  # as make check says it for a merge
                recorded = cfg["base_model_name_or_path"]
                print(f"{name}: {warning}", file=sys.stderr)
            if up_to_date(out, ckpt, args.base):
                log(f"{name}: up to date ({out})")
                done.append(name)
                continue
            n = export(ckpt, args.base, out, args.outtype, args.llama_cpp, args.log)
        except UserError as e:
            out.unlink(missing_ok=True)  # an older export of a checkpoint that no longer converts is not served
            skipped.append(name)
            if isinstance(e, CannotUnmerge):
                advice = f"; serve it merged instead: make CHECKPOINT={name}"
            elif isinstance(e, DoesNotFit) and recorded:
                advice = f"; on the base it was trained on, merged: make CHECKPOINT={name} BASE_MODEL={recorded}"
            else:
                advice = ""
            print(f"{name}: skipped: {e}{advice}", file=sys.stderr)
            continue
        log(f"{name}: {n} LoRA modules -> {out} ({human_bytes(out.stat().st_size)})")
        done.append(name)
    if not args.checkpoint:
        for stale in sorted(args.out_dir.glob("*.gguf")):
            if stale.stem not in found:
                stale.unlink()
                log(f"{stale.stem}: its checkpoint is gone; removed {stale}")
    if not done:
        raise UserError(f"none of the {len(found)} checkpoint(s) can be served unmerged (reasons above)")
    log(f"{len(done)} adapter(s) in {args.out_dir}" + (f"; {len(skipped)} skipped" if skipped else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
