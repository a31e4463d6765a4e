"""Loading a model to generate or score with: a Hugging Face folder through Transformers (16-bit, or nf4/int8
through BitsAndBytes; an adapter on top, unmerged), or a GGUF through llama-cpp-python on the vendored libllama."""
from __future__ import annotations

import os
from pathlib import Path

from lib.common import UserError, has_cuda_backend, has_nvidia_gpu


def quiet_optional_bnb_kernel() -> None:
    """BitsAndBytes looks for an optional CPU nf4 kernel on the Hugging Face hub (the `kernels` package) on CPUs
    with AVX512-BF16 and warns when it is not there; its own kernel is used then, so the warning says nothing
    a user must act on."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "from kernels-community" not in record.getMessage())


def load(model_dir: Path, adapter: Path | None, mode: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    quant = {
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        "16bit": None,
    }[mode]
    kwargs = {"quantization_config": quant} if quant else {"dtype": torch.bfloat16}
    if quant:
        quiet_optional_bnb_kernel()
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    tok = AutoTokenizer.from_pretrained(adapter if adapter and (adapter / "tokenizer_config.json").exists()
                                        else model_dir)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tok


def load_gguf(path: Path, seed: int, lib_dir: Path):
    """llama-cpp-python on the vendored build's libllama (same llama.cpp commit as its own sdist)."""
    if not path.exists():
        raise UserError(f"model file {path} does not exist (run 'make quantize')")
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(lib_dir))
    if not (Path(os.environ["LLAMA_CPP_LIB_PATH"]) / "libllama.so").exists():
        raise UserError(f"no libllama.so in {os.environ['LLAMA_CPP_LIB_PATH']}: run 'make vendor' first")
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise UserError(f"llama-cpp-python is not usable ({e}): run 'make install'") from None
    gpu = has_cuda_backend(Path(os.environ["LLAMA_CPP_LIB_PATH"])) and has_nvidia_gpu()
    return Llama(str(path), n_ctx=4096, n_gpu_layers=-1 if gpu else 0, seed=seed, verbose=False)
