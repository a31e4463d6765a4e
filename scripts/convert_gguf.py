#!/usr/bin/env python3
"""Convert a Hugging Face model folder to a GGUF file with llama.cpp's own converter.

--quant q8_0 (default), f16, bf16, f32 come straight out of convert_hf_to_gguf.py; llama-quantize types
(Q4_K_M, Q5_K_M, Q6_K, Q4_0, ...) go through a 16-bit intermediate that is deleted afterwards.
The output is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, UserError, atomic_file, human_bytes, log, require_free_space, run_main  # noqa: E402

CONVERTER_TYPES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # bytes per weight
QUANTIZE_TYPES = {  # llama-quantize types, with approximate bytes per weight for the disk check
    "Q4_0": 18 / 32, "Q4_1": 20 / 32, "Q5_0": 22 / 32, "Q5_1": 24 / 32, "Q2_K": 0.33, "Q3_K_S": 0.43,
    "Q3_K_M": 0.49, "Q3_K_L": 0.53, "Q4_K_S": 0.57, "Q4_K_M": 0.61, "Q5_K_S": 0.69, "Q5_K_M": 0.71,
    "Q6_K": 0.82, "IQ4_NL": 0.57, "IQ4_XS": 0.54, "TQ1_0": 0.21, "TQ2_0": 0.26}


def run(cmd: list, what: str, logpath: Path) -> str:
    """Run a tool with its output appended to logpath (key lines echoed); return that output."""
    logpath.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    with open(logpath, "a") as logf:
        print("$ " + " ".join(map(str, cmd)), file=logf, flush=True)
        proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            logf.write(line)
            lines.append(line)
            if line.startswith(("INFO:hf-to-gguf:Model successfully", "main: quantize time", "ERROR", "Traceback")):
                print("  " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = logpath.read_text(errors="replace").splitlines()[-12:]
        print("\n".join(tail), file=sys.stderr)
        raise UserError(f"{what} failed (exit {rc}); full log: {logpath}")
    return "".join(lines)


def via_16bit(write_16bit, key: str, out: Path, quantize: Path, logpath: Path) -> None:
    """llama-quantize types: write_16bit(path) makes an f16 GGUF beside `out`, quantized into `out`, then deleted."""
    mid = out.with_name(out.name + ".f16")
    try:
        write_16bit(mid)
        run([quantize, mid, out, key, os.cpu_count() or 1], "llama-quantize", logpath)
    finally:
        mid.unlink(missing_ok=True)


def quant_key(quant: str) -> str:
    """The canonical spelling of a QUANT value (q8_0, f16, Q4_K_M, ...), or a UserError listing the choices."""
    key = quant.lower() if quant.lower() in CONVERTER_TYPES else quant.upper()
    if key not in CONVERTER_TYPES and key not in QUANTIZE_TYPES:
        raise UserError(f"unknown QUANT={quant}: choose one of {', '.join([*CONVERTER_TYPES, *QUANTIZE_TYPES])}")
    return key


def convert(model: Path, quant: str, out: Path, llama_cpp: Path, logpath: Path) -> None:
    converter = llama_cpp / "convert_hf_to_gguf.py"
    quantize = llama_cpp / "build" / "bin" / "llama-quantize"
    if not converter.exists():
        raise UserError(f"{converter} not found: run 'make vendor' first")
    if not (model / "config.json").exists():
        raise UserError(f"{model} is not a Hugging Face model folder (no config.json)")
    key = quant_key(quant)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    cfg = json.loads((model / "config.json").read_text())
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    n_params = weights / (4 if dtype == "float32" else 2)
    per_weight = CONVERTER_TYPES.get(key) or QUANTIZE_TYPES[key]
    need = n_params * per_weight + (0 if key in CONVERTER_TYPES else n_params * 2)
    require_free_space(out.parent, int(need), f"the {key} GGUF")
    naming = []
    if (model / "merge_info.json").exists():  # a merged model: named as merge_gguf.py names it
        from merge_lora import gguf_model_name
        info = json.loads((model / "merge_info.json").read_text())
        naming = ["--model-name", gguf_model_name(Path(info["base"]), Path(info["checkpoint"]), cfg)]
    start = time.perf_counter()
    with atomic_file(out) as tmp:
        if key in CONVERTER_TYPES:
            log(f"converting {model} to {key} GGUF ...")
            run([sys.executable, str(converter), str(model), "--outtype", key, "--outfile", str(tmp), *naming],
                "convert_hf_to_gguf.py", logpath)
        else:
            if not quantize.exists():
                raise UserError(f"{quantize} not found: run 'make vendor' first")
            log(f"converting {model} to a 16-bit GGUF, then quantizing to {key} ...")
            via_16bit(lambda mid: run([sys.executable, converter, model, "--outtype", "f16", "--outfile", mid,
                                       *naming], "convert_hf_to_gguf.py", logpath), key, tmp, quantize, logpath)
    log(f"wrote {out} ({human_bytes(out.stat().st_size)}) in {time.perf_counter() - start:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model folder (the merged model)")
    p.add_argument("--quant", default="q8_0", help="q8_0 (default), f16, bf16, f32, or Q4_K_M, Q6_K, ...")
    p.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    p.add_argument("--llama-cpp", type=Path, default=ROOT / "vendor" / "llama.cpp", help="llama.cpp folder")
    p.add_argument("--log", type=Path, default=ROOT / "out" / "logs" / "convert.log", help="log file")
    args = p.parse_args()
    convert(args.model, args.quant, args.out, args.llama_cpp, args.log)


if __name__ == "__main__":
    run_main(main)
