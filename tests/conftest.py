import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from helpers import LLAMA_CPP, LLAMA_SERVER, make_tiny_llama  # noqa: E402

# Tests that need the llama.cpp build (its tools, libllama, or `make`, which builds it) are marked llama_cpp: `make
# test` runs the others while llama.cpp builds (-m "not llama_cpp"), these afterwards. Tests that need only its
# source (the converter, gguf-py, the vocab files) are marked llama_cpp_source and run in the first group.
# Without the build (or the source) they skip.
needs_llama_cpp = pytest.mark.llama_cpp
needs_llama_source = pytest.mark.llama_cpp_source


def pytest_configure(config):
    config.addinivalue_line("markers", "llama_cpp: needs the llama.cpp build (skipped without one)")
    config.addinivalue_line("markers", "llama_cpp_source: needs the llama.cpp source tree (skipped without it)")


def pytest_collection_modifyitems(config, items):
    missing = {"llama_cpp": (LLAMA_SERVER, "llama.cpp not built (make vendor)"),
               "llama_cpp_source": (LLAMA_CPP / "convert_hf_to_gguf.py", "no llama.cpp source (make vendor)")}
    for marker, (needed, reason) in missing.items():
        if not needed.exists():
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory):
    """(folder, model, tokenizer) of a tiny fp32 Llama with the real Llama 2 SentencePiece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-spm")
    model, tok = make_tiny_llama(folder, "spm")
    return folder, model, tok


@pytest.fixture(scope="session")
def tiny_bpe(tmp_path_factory):
    """(folder, model, tokenizer) of a tiny bf16 Llama with the real Llama 3 BPE tokenizer."""
    import torch
    folder = tmp_path_factory.mktemp("tiny-bpe")
    model, tok = make_tiny_llama(folder, "bpe", dtype=torch.bfloat16)
    return folder, model, tok


@pytest.fixture(scope="session")
def tiny_gguf(tiny_spm, tmp_path_factory):
    """The tiny Llama 2-tokenizer model as an f16 GGUF."""
    from helpers import run_script
    tmp = tmp_path_factory.mktemp("tiny-gguf")
    run_script("convert_gguf.py", "--model", tiny_spm[0], "--quant", "f16", "--out", tmp / "tiny.gguf", "--log",
               tmp / "convert.log")
    return tmp / "tiny.gguf"
