#!/usr/bin/env python3
"""Convert a Hugging Face model folder to a GGUF file with llama.cpp's own converter.

--quant q8_0 (default), f16, bf16, f32 come straight out of convert_hf_to_gguf.py; llama-quantize types
(Q4_K_M, Q5_K_M, Q6_K, Q4_0, ...) go through a 16-bit intermediate that is deleted afterwards; k-quant and IQ
types with an importance matrix computed on it (lib/imatrix.py; --imatrix off: none); Q4_K_M+ and auto: see
merge_gguf.py.
The output is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import ROOT, UserError, atomic_file, human_bytes, log, require_free_space, run_main, run_tool  # noqa: E402
from lib.imatrix import Imatrix, add_imatrix_args  # noqa: E402
from lib.quant_auto import Auto, add_auto_args  # noqa: E402
from lib.quants import CONVERTER_TYPES, QUANTIZE_TYPES, quant_key, via_16bit  # noqa: E402


def refuse_unpadded_vocabulary(model: Path, cfg: dict, llama_cpp: Path) -> None:
    """One line instead of a GGUF llama.cpp refuses: an embedding with more rows than a tokenizer.json-only Llama
    2-style vocabulary, which the converter writes without padding tokens (merge_gguf.py cuts the rows instead)."""
    fast = model / "tokenizer.json"
    if (model / "tokenizer.model").exists() or not fast.exists() or not cfg.get("architectures"):
        return
    from tokenizers import Tokenizer
    n_tokens = Tokenizer.from_file(str(fast)).get_vocab_size(with_added_tokens=True)
    if n_tokens >= int(cfg.get("vocab_size") or 0):
        return
    from merge_gguf import llama_hf_tokens, load_converter  # the converter's own class decides its vocabulary path
    conversion, _ = load_converter(llama_cpp)
    try:
        model_class = conversion.get_model_class(cfg["architectures"][0])
    except NotImplementedError:
        return
    if llama_hf_tokens(model, model_class) is not None:
        raise UserError(f"{model}: the embedding has {cfg['vocab_size']} rows for {n_tokens} tokens in tokenizer.json "
                        f"(no tokenizer.model): llama.cpp's converter writes no padding tokens there and llama.cpp "
                        f"would refuse the GGUF; add the model's tokenizer.model, or merge without KEEP_MERGED "
                        f"(merge_gguf.py keeps one row per token)")


def convert(model: Path, quant: str, out: Path, llama_cpp: Path, logpath: Path, imatrix_args=None) -> None:
    converter = llama_cpp / "convert_hf_to_gguf.py"
    quantize = llama_cpp / "build" / "bin" / "llama-quantize"
    if not converter.exists():
        raise UserError(f"{converter} not found: run 'make vendor' first")
    if not (model / "config.json").exists():
        raise UserError(f"{model} is not a Hugging Face model folder (no config.json)")
    key = quant_key(quant)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    cfg = json.loads((model / "config.json").read_text())
    from lib.merge import require_sentencepiece_file
    require_sentencepiece_file(model, cfg)
    refuse_unpadded_vocabulary(model, cfg, llama_cpp)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    n_params = weights / (4 if dtype == "float32" else 2)
    per_weight = CONVERTER_TYPES.get(key) or QUANTIZE_TYPES[key]
    need = n_params * per_weight + (0 if key in CONVERTER_TYPES else n_params * 2)
    require_free_space(out.parent, int(need), f"the {key} GGUF")
    naming = []
    if (model / "merge_info.json").exists():  # a merged model: named as merge_gguf.py names it
        from lib.merge import gguf_model_name
        info = json.loads((model / "merge_info.json").read_text())
        naming = ["--model-name", gguf_model_name(Path(info["base"]), Path(info["checkpoint"]), cfg)]
    # a merged model's checkpoint may record its training data, the calibration text
    ckpt = Path(info["checkpoint"]) if naming and info.get("checkpoint") else None
    imatrix = Imatrix.from_args(imatrix_args, key, ckpt, logpath) if imatrix_args else None
    auto = Auto(imatrix_args, logpath) if key == "auto" and imatrix_args else None
    start = time.perf_counter()
    with atomic_file(out) as tmp:
        if key in CONVERTER_TYPES:
            log(f"converting {model} to {key} GGUF ...")
            run_tool([sys.executable, str(converter), str(model), "--outtype", key, "--outfile", str(tmp), *naming],
                "convert_hf_to_gguf.py", logpath)
        else:
            if not quantize.exists():
                raise UserError(f"{quantize} not found: run 'make vendor' first")
            log(f"converting {model} to a 16-bit GGUF, then quantizing to {key} ...")
            via_16bit(lambda mid: run_tool([sys.executable, converter, model, "--outtype", "f16", "--outfile", mid,
                                       *naming], "convert_hf_to_gguf.py", logpath), key, tmp, quantize, logpath,
                      imatrix, auto)
    log(f"wrote {out} ({human_bytes(out.stat().st_size)}) in {time.perf_counter() - start:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model folder (the merged model)")
    p.add_argument("--quant", default="q8_0", help="q8_0 (default), f16, bf16, f32, or Q4_K_M, Q6_K, ...")
    p.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    p.add_argument("--llama-cpp", type=Path, default=ROOT / "vendor" / "llama.cpp", help="llama.cpp folder")
    p.add_argument("--log", type=Path, default=ROOT / "out" / "logs" / "convert.log", help="log file")
    add_imatrix_args(p)
    add_auto_args(p)
    args = p.parse_args()
    convert(args.model, args.quant, args.out, args.llama_cpp, args.log, args)


if __name__ == "__main__":
    run_main(main)
