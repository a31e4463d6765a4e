"""The GGUF types QUANT can name: the converter's own (f32, f16, bf16, q8_0) and llama-quantize's (Q4_K_M, ...,
made from a 16-bit intermediate), with approximate bytes per weight for the disk-space checks; and per-tensor
plans at a k-quant type's size (Q4_K_M+, lib/quant_plan.py)."""
from __future__ import annotations

import os
from pathlib import Path

from lib.common import UserError, run_tool

CONVERTER_TYPES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # bytes per weight
QUANTIZE_TYPES = {  # llama-quantize types, with approximate bytes per weight for the disk check
    "Q4_0": 18 / 32, "Q4_1": 20 / 32, "Q5_0": 22 / 32, "Q5_1": 24 / 32, "Q2_K": 0.33, "Q3_K_S": 0.43,
    "Q3_K_M": 0.49, "Q3_K_L": 0.53, "Q4_K_S": 0.57, "Q4_K_M": 0.61, "Q5_K_S": 0.69, "Q5_K_M": 0.71,
    "Q6_K": 0.82, "IQ4_NL": 0.57, "IQ4_XS": 0.54, "TQ1_0": 0.21, "TQ2_0": 0.26}
# a per-tensor plan at that type's size (QUANT=Q4_K_M+): needs the importance matrix
PLAN_TYPES = {f"{k}+": v for k, v in QUANTIZE_TYPES.items() if k[:2] in ("Q3", "Q4", "Q5") and "_K_" in k}
QUANTIZE_TYPES.update(PLAN_TYPES)
QUANTIZE_TYPES["auto"] = 34 / 32  # the smallest candidate within MAX_KL (lib/quant_auto.py): at most q8_0
# what a plan minimizes (PLAN_COST): the KL of each group of tensors measured on the calibration text (default), or
# the weight error alone (no model runs, far faster on a large model, but blind to a type that rounds the
# fine-tune away: lib/quant_plan.py, docs/quality.md)
PLAN_COSTS = ("kl", "weights")


def via_16bit(write_16bit, key: str, out: Path, quantize: Path, logpath: Path, imatrix=None, auto=None) -> None:
    """llama-quantize types: write_16bit(path) makes an f16 GGUF beside `out`, quantized into `out`, then deleted.
    imatrix (lib/imatrix.Imatrix, or None): gives the importance matrix of that f16 GGUF for --imatrix.
    auto (lib/quant_auto.Auto) chooses the type for QUANT=auto."""
    mid = out.with_name(out.name + ".f16")
    try:
        write_16bit(mid)
        if key == "auto":
            auto(mid, out, imatrix(mid), imatrix.text_file(), imatrix.calib.held_out, imatrix.plan_cost)
            return
        if key in PLAN_TYPES:
            from lib.quant_plan import quantize_with_plan
            quantize_with_plan(mid, out, key, imatrix(mid), imatrix.text_file(), quantize.parent, logpath,
                               cost=imatrix.plan_cost)
            return
        extra = ["--imatrix", imatrix(mid)] if imatrix is not None else []
        run_tool([quantize, *extra, mid, out, key, os.cpu_count() or 1], "llama-quantize", logpath)
    finally:
        mid.unlink(missing_ok=True)


def quant_key(quant: str) -> str:
    """The canonical spelling of a QUANT value (q8_0, f16, Q4_K_M, ...), or a UserError listing the choices."""
    key = quant.lower() if quant.lower() in CONVERTER_TYPES or quant.lower() == "auto" else quant.upper()
    if key not in CONVERTER_TYPES and key not in QUANTIZE_TYPES:
        raise UserError(f"unknown QUANT={quant}: choose one of {', '.join([*CONVERTER_TYPES, *QUANTIZE_TYPES])} "
                        f"({', '.join(PLAN_TYPES)}: a per-tensor plan at that type's size; auto: the smallest within "
                        f"MAX_KL)")
    return key
