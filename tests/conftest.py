import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from helpers import LLAMA_SERVER, make_tiny_llama  # noqa: E402

# Tests that need the llama.cpp build (its tools, libllama, or `make`, which builds it) carry this marker: `make
# test` runs the others while llama.cpp builds (-m "not llama_cpp"), these afterwards; without a build they skip.
needs_llama_cpp = pytest.mark.llama_cpp


def pytest_configure(config):
    config.addinivalue_line("markers", "llama_cpp: needs the llama.cpp build (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if not LLAMA_SERVER.exists():
        skip = pytest.mark.skip(reason="llama.cpp not built (make vendor)")
        for item in items:
            if "llama_cpp" in item.keywords:
                item.add_marker(skip)


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
