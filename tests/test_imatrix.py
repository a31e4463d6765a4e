"""Importance matrices (lib/imatrix.py): the calibration text chosen, computed once per model and text, and used
by llama-quantize (the GGUF's quantize.imatrix.* keys); never the held-out tales."""
import json
from pathlib import Path

import pytest

from conftest import needs_llama_cpp
from helpers import LLAMA_CPP, ROOT, error_line, make_adapter, make_tiny_llama, read_gguf, run_script

GRIMM = ROOT / "data" / "grimm_stories.jsonl"


def test_calibration_is_the_training_split_never_the_held_out_tales():
    from lib.imatrix import read_text
    from lib.tales import load_tales, split_tales
    train, held = split_tales(load_tales(GRIMM))
    text = read_text(GRIMM)
    assert held and all(t["story"][:200] not in text for t in held)
    assert all(t["story"][:200] in text for t in train)


def test_calibration_order(tmp_path):
    from lib.imatrix import GENERAL_TEXT, choose_calibration
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert choose_calibration(None, None, ckpt).source == GENERAL_TEXT.name  # nothing recorded
    (ckpt / "training_args.json").write_text(json.dumps({"dataset": "data/grimm_stories.jsonl"}))
    assert choose_calibration(None, None, ckpt).source == GRIMM.name  # recorded, relative to the repository
    mine = tmp_path / "mine.txt"
    mine.write_text("my text " * 100)
    assert choose_calibration(None, mine, ckpt).text == mine.read_text()  # DATASET= over the record
    assert choose_calibration(mine, GRIMM, ckpt).text == mine.read_text()  # CALIBRATION= over everything


@pytest.fixture(scope="module")
def k_quant_model(tmp_path_factory):
    """A tiny base with rows of 256 (k-quants need them) and an adapter whose training_args.json records the
    Grimm tales, as train_lora.py writes it."""
    tmp = tmp_path_factory.mktemp("imatrix")
    base_model, _ = make_tiny_llama(tmp / "base", "spm", hidden=256)
    make_adapter(base_model, tmp / "ckpts" / "a")
    (tmp / "ckpts" / "a" / "training_args.json").write_text(json.dumps({"dataset": str(GRIMM)}))
    return tmp


def quantize(tmp, out, *extra, check=True):
    return run_script("merge_gguf.py", "--base", tmp / "base", "--checkpoints-dir", tmp / "ckpts", "--out", out,
                      "--quant", "Q4_K_M", "--log", tmp / "q.log", "--imatrix-cache", tmp / "cache",
                      "--imatrix-chunks", 4, *extra, check=check)


@needs_llama_cpp
def test_imatrix_is_computed_once_and_used(k_quant_model):
    tmp = k_quant_model
    first = quantize(tmp, tmp / "a.gguf")
    cached = list((tmp / "cache").glob("imatrix-*.gguf"))
    assert len(cached) == 1 and "computing the importance matrix" in first.stdout
    metadata, _ = read_gguf(tmp / "a.gguf")
    assert metadata["quantize.imatrix.file"].endswith(cached[0].name)
    assert Path(metadata["quantize.imatrix.dataset"]).name.startswith("grimm_stories-")  # the recorded data
    assert metadata["quantize.imatrix.chunks_count"] > 0 and metadata["quantize.imatrix.entries_count"] > 0
    mtime = cached[0].stat().st_mtime_ns
    second = quantize(tmp, tmp / "b.gguf")
    assert "(cached)" in second.stdout and "computing" not in second.stdout
    assert cached[0].stat().st_mtime_ns == mtime
    assert (tmp / "q.log").read_text().count("llama-imatrix -m") == 1  # the tool ran once for the two GGUFs
    assert (tmp / "a.gguf").read_bytes() == (tmp / "b.gguf").read_bytes()


@needs_llama_cpp
def test_imatrix_off_and_errors(k_quant_model, tmp_path):
    tmp = k_quant_model
    quantize(tmp, tmp_path / "off.gguf", "--imatrix", "off")
    metadata, _ = read_gguf(tmp_path / "off.gguf")
    assert metadata["general.file_type"] == 15 and not any(k.startswith("quantize.imatrix") for k in metadata)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    proc = quantize(tmp, tmp_path / "x.gguf", "--calibration", empty, check=False)
    assert proc.returncode == 1 and error_line(proc).endswith(f"calibration file {empty} is empty")
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a king.\n")
    proc = quantize(tmp, tmp_path / "x.gguf", "--calibration", short, check=False)
    assert proc.returncode == 1 and "too short: llama-imatrix needs at least 1024 tokens" in error_line(proc)
    # a build without llama-imatrix: said before the merge
    fake = tmp_path / "llama.cpp"
    (fake / "build" / "bin").mkdir(parents=True)
    (fake / "build" / "bin" / "llama-quantize").symlink_to(LLAMA_CPP / "build" / "bin" / "llama-quantize")
    proc = quantize(tmp, tmp_path / "x.gguf", "--llama-cpp", fake, check=False)
    assert proc.returncode == 1 and "llama-imatrix not found" in error_line(proc) and "IMATRIX=off" in error_line(proc)
    assert not list(tmp_path.glob("x.gguf*"))

