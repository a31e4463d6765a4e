"""make package: the GGUF and .args embedded in a llamafile-style executable (here a stand-in binary)."""
import subprocess
import zipfile

from conftest import needs_llama_cpp
from helpers import error_line, run_script

import package_llamafile

pytestmark = needs_llama_cpp


def stand_in_binary(path, with_zip: bool):
    """A tiny executable in place of the llamafile release (which cannot be downloaded here); like the real
    one it may already carry a ZIP of its own."""
    path.write_text('#!/bin/sh\necho "stand-in ran with: $*"\nexit 0\n')
    if with_zip:
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr("assets/own-file.txt", "the binary's own asset")
    path.chmod(0o755)
    return path


def test_package_embeds_the_gguf_aligned_with_default_args(tiny_gguf, tmp_path):
    for with_zip in (False, True):
        binary = stand_in_binary(tmp_path / f"llamafile-{with_zip}", with_zip)
        out = tmp_path / f"model-{with_zip}.llamafile"
        run_script("package_llamafile.py", "--llamafile", binary, "--model", tiny_gguf, "--out", out,
                   "--port", "9001")
        with zipfile.ZipFile(out) as zf:
            names = zf.namelist()
            assert names[-2:] == [".args", tiny_gguf.name]
            assert ("assets/own-file.txt" in names) == with_zip  # the binary's own archive is kept
            assert zf.read(tiny_gguf.name) == tiny_gguf.read_bytes()
            assert zf.getinfo(tiny_gguf.name).compress_type == zipfile.ZIP_STORED
            assert zf.read(".args").decode().splitlines() == [
                "-m", tiny_gguf.name, "--host", "127.0.0.1", "--port", "9001", "-ngl", "999", "..."]
        assert package_llamafile.data_offset(out, tiny_gguf.name) % 65536 == 0  # mmap-able in place
        assert out.read_bytes().startswith(binary.read_bytes()[:40])
        ran = subprocess.run([str(out), "--server"], capture_output=True, text=True)
        assert ran.returncode == 0 and "stand-in ran with: --server" in ran.stdout


def test_package_without_llamafile_binary_says_so(tiny_gguf, tmp_path):
    out = tmp_path / "m.llamafile"
    proc = run_script("package_llamafile.py", "--llamafile", tmp_path / "none", "--model", tiny_gguf, "--out", out,
                      check=False)
    assert proc.returncode == 1 and "no llamafile binary at" in error_line(proc)
    assert not out.exists() and not list(tmp_path.glob("*.llamafile*"))


def test_alignment_holds_for_zip64_entries(tiny_gguf, tmp_path, monkeypatch):
    """A GGUF over 4 GiB gets a zip64 extra field, which moves its data; checked here by lowering the limit."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1024)
    out = tmp_path / "big.llamafile"
    package_llamafile.package(stand_in_binary(tmp_path / "llamafile", True), tiny_gguf, out, "-m\nx\n...\n")
    assert package_llamafile.data_offset(out, tiny_gguf.name) % 65536 == 0
    with zipfile.ZipFile(out) as zf:
        assert zf.read(tiny_gguf.name) == tiny_gguf.read_bytes()
