"""Finding and reading the LoRA checkpoint a user dropped into quantization/checkpoints/."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lib.common import UserError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def candidates(folder: Path) -> list[Path]:
    """Checkpoint folders directly inside `folder` (hidden folders and plain files are ignored)."""
    if (folder / "adapter_config.json").exists():
        return [folder]
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def select_checkpoint(folder: Path, name: str | None = None, fallback: Path | None = None) -> Path:
    """The one checkpoint to merge: `name` if given, else the only folder there, else `fallback`."""
    folder = Path(folder)
    if name:
        chosen = Path(name)
        if not chosen.is_absolute() and not chosen.exists():
            chosen = folder / name
        if not chosen.is_dir():
            raise UserError(f"CHECKPOINT={name}: no such folder (looked in {folder})")
        return validate(chosen)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist")
    found = candidates(folder)
    if not found:
        if fallback is not None:
            return validate(Path(fallback))
        raise UserError(f"no checkpoint in {folder}: copy your adapter folder (adapter_config.json + "
                        f"adapter_model.safetensors) there, or set CHECKPOINT=<path>")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserError(f"{len(found)} checkpoints in {folder} ({names}): choose one with CHECKPOINT=<name>")
    return validate(found[0])


def training_step(folder: Path) -> int:
    """The step number of a Trainer checkpoint folder (checkpoint-500 -> 500); -1 for any other name."""
    head, _, step = folder.name.rpartition("-")
    return int(step) if head and step.isdigit() else -1


def validate(ckpt: Path) -> Path:
    """ckpt itself when it holds an adapter; for a Trainer output folder (checkpoint-N/ folders inside, no
    adapter of its own) the one checkpoint there, or the latest step of several (said on stderr)."""
    if not (ckpt / "adapter_config.json").exists():
        nested = sorted((p.parent for p in ckpt.glob("*/adapter_config.json")),
                        key=lambda p: (training_step(p), p.name))
        if len(nested) == 1:
            return validate(nested[0])
        if nested:
            names = ", ".join(p.name for p in nested)
            print(f"{ckpt} holds {len(nested)} training checkpoints ({names}): using the latest, {nested[-1].name} "
                  f"(CHECKPOINT={ckpt.name}/<name> to choose another)", file=sys.stderr)
            return validate(nested[-1])
        what = "is empty" if not any(ckpt.iterdir()) else "has no adapter_config.json"
        raise UserError(f"checkpoint folder {ckpt} {what}: expected a PEFT adapter "
                        f"(adapter_config.json + adapter_model.safetensors)")
    if not any((ckpt / f).exists() for f in ADAPTER_FILES):
        raise UserError(f"checkpoint {ckpt} has adapter_config.json but no adapter_model.safetensors")
    return ckpt


def read_adapter_config(ckpt: Path) -> dict:
    path = ckpt / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise UserError(f"unsupported adapter type {cfg.get('peft_type')!r} in {path}: only LoRA adapters "
                        f"(peft_type LORA) can be merged")
    if "r" not in cfg:
        raise UserError(f"{path} has no rank 'r'")
    return cfg


def read_adapter_weights(ckpt: Path) -> dict:
    """name -> tensor of the adapter file (safetensors, or a PyTorch pickle read with weights_only)."""
    import torch

    from lib.tensor_io import load_safetensors

    st = ckpt / "adapter_model.safetensors"
    if st.exists():
        return load_safetensors(st)
    path = ckpt / "adapter_model.bin"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged pickle
        raise UserError(f"cannot read {path}: {e}") from None
