"""vendor_llama_cpp.py fetch: the patch set in patches/llama.cpp is applied on top of the pinned tree, a tree of
another patch set is fetched again, and a patch that does not apply is one error line that leaves the tree as
it was. A local git repository stands in for GitHub (the clone route), so no network is needed."""
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import needs_llama_cpp
from helpers import ROOT, error_line, run_script
from vendor_llama_cpp import apply_patches  # scripts/ is on sys.path (conftest)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def fake_llama_repo(folder: Path) -> str:
    """A git repository holding the files fetch checks for; returns its commit."""
    folder.mkdir()
    for name in ("convert_hf_to_gguf.py", "gguf-py/README.md", "tools/server/server.cpp", "CMakeLists.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"{name}\n")
    (folder / "tools/server/server.cpp").write_text("int slot = pick_lru();\n")
    git(folder, "init", "-q")
    git(folder, "add", ".")
    git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pinned")
    return git(folder, "rev-parse", "HEAD")


def write_patch(folder: Path, new_line: str, header: str = "why\n") -> Path:
    folder.mkdir(exist_ok=True)
    patch = folder / "0001-slot.patch"
    patch.write_text(f"{header}\n--- a/tools/server/server.cpp\n+++ b/tools/server/server.cpp\n@@ -1 +1 @@\n"
                     f"-int slot = pick_lru();\n+{new_line}\n")
    return patch


def fetch(dest: Path, repo: Path, commit: str, patches: Path, tmp: Path, check: bool = True):
    return run_script("vendor_llama_cpp.py", "fetch", "--dest", dest, "--commit", commit, "--repo", repo,
                      "--patches", patches, "--log", tmp / "vendor.log", check=check,
                      env={"LORA_SHIP_CACHE": str(tmp / "cache")})


def test_fetch_applies_the_patch_set_and_refetches_when_it_changes(tmp_path):
    commit = fake_llama_repo(tmp_path / "upstream")
    # dest inside another git repository, as vendor/llama.cpp sits inside this project's checkout
    git(tmp_path, "init", "-q")
    dest = tmp_path / "vendor" / "llama.cpp"
    patches = tmp_path / "patches"

    write_patch(patches, "int slot = pick_lowest_free();")
    fetch(dest, tmp_path / "upstream", commit, patches, tmp_path)
    assert (dest / "tools/server/server.cpp").read_text() == "int slot = pick_lowest_free();\n"
    first_id = (dest / ".lora-ship-source").read_text().split()[2]

    again = fetch(dest, tmp_path / "upstream", commit, patches, tmp_path)
    assert "already in" in again.stderr + again.stdout

    write_patch(patches, "int slot = pick_lowest_free(); // v2")
    fetch(dest, tmp_path / "upstream", commit, patches, tmp_path)
    assert (dest / "tools/server/server.cpp").read_text() == "int slot = pick_lowest_free(); // v2\n"
    assert (dest / ".lora-ship-source").read_text().split()[2] != first_id

    # a patch that does not apply: one line naming it, and the tree fetched before stays as it was
    (patches / "0002-broken.patch").write_text("--- a/CMakeLists.txt\n+++ b/CMakeLists.txt\n@@ -1 +1 @@\n"
                                              "-not what the file says\n+x\n")
    proc = fetch(dest, tmp_path / "upstream", commit, patches, tmp_path, check=False)
    assert proc.returncode == 1
    assert "0002-broken.patch does not apply" in error_line(proc)
    assert (dest / "tools/server/server.cpp").read_text() == "int slot = pick_lowest_free(); // v2\n"
    assert not list(dest.parent.glob(".llama.cpp.*"))

    proc = fetch(dest, tmp_path / "upstream", commit, tmp_path / "no-such-folder", tmp_path, check=False)
    assert proc.returncode == 1 and "no-such-folder does not exist" in error_line(proc)


def test_the_project_patches_carry_a_reason_and_touch_only_llama_cpp_paths():
    patches = sorted((ROOT / "patches" / "llama.cpp").glob("*.patch"))
    assert patches
    for p in patches:
        text = p.read_text()
        header = text[:text.index("--- a/")]
        assert "Why:" in header, p.name
        targets = [line[6:] for line in text.splitlines() if line.startswith("+++ b/")]
        assert targets and all(t.split("/")[0] in ("src", "tools", "ggml", "common", "include") for t in targets)


def test_apply_patches_to_a_plain_tree_inside_another_repository(tmp_path):
    """The sdist route's tree has no .git of its own and sits inside this project's checkout: the patch must
    still land on the tree's own files."""
    git(tmp_path, "init", "-q")
    src = tmp_path / "vendor" / "tree"
    (src / "tools/server").mkdir(parents=True)
    (src / "tools/server/server.cpp").write_text("int slot = pick_lru();\n")
    patch = write_patch(tmp_path / "patches", "int slot = pick_lowest_free();")
    with open(tmp_path / "log", "w") as logf:
        apply_patches(src, [patch], logf)
    assert (src / "tools/server/server.cpp").read_text() == "int slot = pick_lowest_free();\n"


@needs_llama_cpp
def test_the_built_cpu_backend_leaves_out_the_amx_matmul():
    """llama.cpp's AMX matmul segfaults on some AMX Xeons (upstream #20824; it crashed every request on this
    project's own 2-core AMX machine): the build keeps it out with -mno-amx-*. On an AMX machine a build without
    those flags carries ggml_backend_amx_mul_mat; a machine without AMX never compiles it in."""
    libs = sorted((ROOT / "vendor" / "llama.cpp" / "build" / "bin").glob("libggml-cpu*.so*"))
    if not libs or shutil.which("nm") is None:
        pytest.skip("no llama.cpp CPU library built (make vendor) or no nm")
    symbols = subprocess.run(["nm", "-C", str(libs[0])], capture_output=True, text=True).stdout
    assert "ggml_backend_amx_mul_mat" not in symbols, f"{libs[0].name} carries the AMX matmul"


@needs_llama_cpp
def test_a_tool_prints_its_last_lines_before_exiting(tiny_gguf, tmp_path):
    """Patch 0008: llama.cpp logs through a worker thread and leaks the logger on purpose, so lines still queued
    at exit were lost (about one llama-perplexity run in nine on the 2-core box ended without its final
    estimate). Every one of 20 runs now prints its last chunk and the final estimate."""
    from conftest import LLAMA_SERVER
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "data" / "grimm_stories.jsonl").read_text()[:6000])
    cmd = [LLAMA_SERVER.with_name("llama-perplexity"), "-m", tiny_gguf, "-f", text, "--ctx-size", "64",
           "--chunks", "3", "--batch-size", "64", "--threads", "2"]
    for run in range(20):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "[3]" in out.stdout + out.stderr and "Final estimate: PPL" in out.stdout + out.stderr, run
