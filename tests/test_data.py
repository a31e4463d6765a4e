"""make_data.py: Gutenberg #2591 -> the 62-tale JSONL, checked against the pinned sha256."""
import pytest

from helpers import ROOT, error_line, run_script

BOOK = ROOT.parent / "shared" / "data" / "pg2591.txt"
EXPECTED = ROOT.parent / "shared" / "data" / "grimm_stories.jsonl"
needs_book = pytest.mark.skipif(not BOOK.exists(), reason="../shared/data/pg2591.txt not present")


@needs_book
def test_split_equals_the_reference_file(tmp_path):
    out = tmp_path / "tales.jsonl"
    run_script("make_data.py", "--source", BOOK, "--out", out)
    assert out.read_bytes() == EXPECTED.read_bytes()
    assert out.read_bytes() == (ROOT / "data" / "grimm_stories.jsonl").read_bytes()  # the committed copy


def test_wrong_checksum_stops_and_writes_nothing(tmp_path):
    book = tmp_path / "pg2591.txt"
    book.write_text("*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nCONTENTS:\n*** END OF THIS PROJECT GUTENBERG EBOOK")
    proc = run_script("make_data.py", "--source", book, "--out", tmp_path / "t.jsonl", check=False)
    assert proc.returncode == 1 and "not the pinned edition" in error_line(proc)
    assert not (tmp_path / "t.jsonl").exists()


def test_missing_source(tmp_path):
    proc = run_script("make_data.py", "--source", tmp_path / "nope.txt", "--out", tmp_path / "t.jsonl", check=False)
    assert proc.returncode == 1 and "does not exist" in error_line(proc)
