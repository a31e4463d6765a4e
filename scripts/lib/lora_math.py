"""The arithmetic of merging a LoRA adapter, written to match PEFT's `get_delta_weight` and DoRA merge.

Everything runs in float32 and is cast back to the output dtype once, at the end, so a bf16 base is
rounded a single time (PEFT on CPU rounds the delta and then the sum: the difference is at most 1 ulp).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch


@dataclass
class LoraConfig:
    """The fields of PEFT's adapter_config.json that change the merged weights."""
    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        return cls(r=int(d["r"]), lora_alpha=float(d.get("lora_alpha", d["r"])),
                   use_rslora=bool(d.get("use_rslora", False)), fan_in_fan_out=bool(d.get("fan_in_fan_out", False)),
                   use_dora=bool(d.get("use_dora", False)), rank_pattern=d.get("rank_pattern") or {},
                   alpha_pattern=d.get("alpha_pattern") or {})

    def scaling(self, module: str) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA), honouring per-module rank and alpha patterns."""
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(patterns: dict, module: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def linear_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """ΔW = scaling · B @ A, shaped like the base weight ([out, in], or [in, out] with fan_in_fan_out)."""
    delta = (lora_b.float() @ lora_a.float()) * scaling
    return delta.T if fan_in_fan_out else delta


def embedding_delta(lora_embedding_a: torch.Tensor, lora_embedding_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """For nn.Embedding PEFT stores A as [r, vocab] and B as [dim, r]: ΔW = scaling · (B @ A)ᵀ, [vocab, dim]."""
    return (lora_embedding_b.float() @ lora_embedding_a.float()).T * scaling


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """DoRA: rescale each output row of W + ΔW to the learned magnitude m: m · (W + ΔW) / ‖W + ΔW‖."""
    merged = weight.float() + delta
    rows = merged.T if fan_in_fan_out else merged
    norm = torch.linalg.norm(rows, dim=1)
    rows = rows * (magnitude.float() / norm).view(-1, 1)
    return rows.T if fan_in_fan_out else rows


def replace_rows(rows: torch.Tensor, token_ids: list[int], values: torch.Tensor, start: int) -> torch.Tensor:
    """PEFT's trainable tokens (index_copy on merge): the rows of `token_ids` take the trained values. `rows` are
    rows start:start+len(rows) of the embedding; ids outside them are left to the other row ranges."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    inside = (ids >= start) & (ids < start + rows.shape[0])
    rows = rows.clone()
    rows[ids[inside] - start] = values[inside].to(rows.dtype)
    return rows
