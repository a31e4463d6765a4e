#!/usr/bin/env python3
"""Fetch llama.cpp at a pinned commit into vendor/llama.cpp and build its tools (stdlib only).

Source: a git clone of the llama.cpp repository at the pinned commit; where GitHub cannot be reached,
the same commit's tree as vendored by the PyPI sdist of llama-cpp-python (checked against a pinned sha256),
so a machine with only a PyPI mirror still builds the very same source. Either way the patches in
patches/llama.cpp/ are then applied in name order (git apply, or patch -p1): small serving fixes, each
explained in its header and in the README; a tree fetched before the patch set changed is fetched again.

Build: llama-server, llama-quantize, llama-imatrix, llama-perplexity and llama-batched-bench with CMake: CUDA when nvcc and
an NVIDIA GPU are found (or --backend cuda), else CPU; tuned to this machine's CPU (llama.cpp's default), but
without its AMX code (see NO_AMX_FLAGS).
The build folder lives in a cache keyed by commit, patch set and backend (vendor/llama.cpp/build links to
it), so a fresh clone of this project on the same machine reuses an earlier build instead of compiling again.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import ROOT, UserError, has_nvidia_gpu, log, run_main  # noqa: E402

DEFAULT_COMMIT = "0c1e57098"
DEFAULT_REPO = "https://github.com/ggml-org/llama.cpp"
SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_TREE = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
TOOLS = ("llama-server", "llama-quantize", "llama-imatrix", "llama-perplexity", "llama-batched-bench")
# llama.cpp's AMX matrix multiply, which -march=native compiles in on Xeons with AMX (Sapphire Rapids and
# newer), segfaults on some of them at the first request (upstream issue #20824, open, no fix at the pinned
# commit; seen here on a 2-core AMX virtual machine). Builds leave it out; AVX-512 and the rest stay.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
MARKER = ".lora-ship-source"
PATCH_DIR = ROOT / "patches" / "llama.cpp"


def patch_files(patch_dir: Path) -> list[Path]:
    if not patch_dir.is_dir():  # a mistyped --patches must not give an unpatched build silently
        raise UserError(f"patch folder {patch_dir} does not exist")
    return sorted(patch_dir.glob("*.patch"))


def patch_set_id(patches: list[Path]) -> str:
    """Short hash of the patches' names and contents ("none" without patches): part of the marker and build key."""
    if not patches:
        return "none"
    h = hashlib.sha256()
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:10]


def apply_patches(src: Path, patches: list[Path], logf) -> None:
    """Apply each patch to the tree src, with git apply where git exists, else patch -p1; one error line if not."""
    for p in patches:
        if shutil.which("git"):
            cmd = ["git", "apply", "--whitespace=nowarn", str(p.resolve())]
        elif shutil.which("patch"):
            cmd = ["patch", "-p1", "--forward", "--batch", "-i", str(p.resolve())]
        else:
            raise UserError(f"applying {p.name} needs git or patch; install one of them")
        print("$ " + " ".join(cmd), file=logf, flush=True)
        # the ceiling keeps git from looking for a repository above src (vendor/ sits in this project's checkout)
        env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(src.resolve().parent))
        r = subprocess.run(cmd, cwd=src, env=env, stdout=logf, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise UserError(f"{p} does not apply to this llama.cpp tree (log: {logf.name})")


def cache_dir() -> Path:
    base = os.environ.get("LORA_SHIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora-ship")
    return Path(base)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clone_from_git(repo: str, commit: str, dest: Path, logf) -> bool:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    steps = [
        ["git", "clone", "--quiet", "--filter=blob:none", "--no-checkout", repo, str(dest)],
        ["git", "-C", str(dest), "checkout", "--quiet", commit],
    ]
    for cmd in steps:
        try:
            r = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"{cmd[:3]}: {e}", file=logf)
            return False
        if r.returncode != 0:
            return False
    return True


def extract_from_sdist(dest: Path, logf) -> None:
    """Unpack llama.cpp's tree from the llama-cpp-python sdist (downloaded once into the cache)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / SDIST_FILE
    if not sdist.exists() or sha256_of(sdist) != SDIST_SHA256:
        log(f"downloading the {SDIST} sdist from PyPI (about 75 MB) ...")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            r = subprocess.run(
                # --no-binary for this package only: with :all: pip also built the sdist's build requirements
                # from source to read its metadata (minutes without a pip cache; 18 s this way)
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
                 "--disable-pip-version-check", "-d", tmp, SDIST],
                stdout=logf, stderr=subprocess.STDOUT)
            got = Path(tmp) / SDIST_FILE
            if r.returncode != 0 or not got.exists():
                raise UserError(f"could not fetch llama.cpp: GitHub unreachable and 'pip download {SDIST}' failed "
                                f"(log: {logf.name})")
            digest = sha256_of(got)
            if digest != SDIST_SHA256:
                raise UserError(f"sha256 mismatch for {SDIST_FILE}: got {digest}, pinned {SDIST_SHA256}")
            got.replace(sdist)
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(SDIST_TREE) and len(m.name) > len(SDIST_TREE):
                m.name = m.name[len(SDIST_TREE):]
                if m.name == ".git":  # a submodule link into the sdist author's repository: dangling here
                    continue
                members.append(m)
        tar.extractall(dest, members=members, filter="data")


def read_marker(dest: Path) -> list[str]:
    """[commit, origin, patch set id] of a tree this tool fetched, or [] (older markers lack the patch set)."""
    marker = dest / MARKER
    if not marker.exists():
        return []
    fields = marker.read_text().split()
    return fields + ["none"] * (3 - len(fields))


def fetch(args) -> None:
    dest = Path(args.dest)
    patches = patch_files(Path(args.patches))
    patch_id = patch_set_id(patches)
    have = read_marker(dest)
    if have[:1] == [args.commit] and have[2] == patch_id:
        (dest / MARKER).touch()  # newer than the patch files, for make
        log(f"llama.cpp {args.commit} already in {dest} ({have[1]}, patch set {patch_id})")
        return
    if dest.exists() and not have:
        raise UserError(f"{dest} exists but is not llama.cpp {args.commit} from this tool; remove it first "
                        f"(or run 'make clean-vendor')")
    dest.parent.mkdir(parents=True, exist_ok=True)
    logpath = Path(args.log)
    logpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp.tmp-", dir=dest.parent))
    try:
        with open(logpath, "a") as logf:
            log(f"cloning llama.cpp {args.commit} from {args.repo} ...")
            if clone_from_git(args.repo, args.commit, tmp / "src", logf):
                origin = "git"
            else:
                shutil.rmtree(tmp / "src", ignore_errors=True)
                if args.commit != DEFAULT_COMMIT:
                    raise UserError(f"could not clone llama.cpp {args.commit} from {args.repo} (log: {logpath}); "
                                    f"the offline route carries only {DEFAULT_COMMIT}")
                log(f"GitHub unreachable: taking llama.cpp {args.commit} from the PyPI sdist {SDIST} instead")
                extract_from_sdist(tmp / "src", logf)
                origin = "sdist"
        for needed in ("convert_hf_to_gguf.py", "gguf-py", "tools/server", "CMakeLists.txt"):
            if not (tmp / "src" / needed).exists():
                raise UserError(f"llama.cpp source from {origin} lacks {needed}; see {logpath}")
        if patches:
            log(f"applying {len(patches)} patch(es) from {args.patches}: {', '.join(p.name for p in patches)}")
            with open(logpath, "a") as logf:
                apply_patches(tmp / "src", patches, logf)
        (tmp / "src" / MARKER).write_text(f"{args.commit} {origin} {patch_id}\n")
        if dest.exists():  # our own tree of another commit or patch set: its build stays in the cache
            old = Path(tempfile.mkdtemp(prefix=".llama.cpp.old-", dir=dest.parent))
            dest.rename(old / "src")
            (tmp / "src").rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            (tmp / "src").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"llama.cpp {args.commit} ready in {dest} (from {origin}, patch set {patch_id})")


def find_nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin/nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def no_amx_cmake_flags() -> list[str]:
    """CMake flags that keep AMX out of an x86-64 build; none where the compiler has no AMX to turn off."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    probe = subprocess.run([os.environ.get("CC", "cc"), *NO_AMX_FLAGS.split(), "-x", "c", "-c", "-o", os.devnull,
                            "-"], input="", capture_output=True, text=True)
    if probe.returncode != 0:  # a compiler too old for these flags cannot emit AMX code either
        return []
    return [f"-DCMAKE_{lang}_FLAGS={' '.join(filter(None, [os.environ.get(env, ''), NO_AMX_FLAGS]))}"
            for lang, env in (("C", "CFLAGS"), ("CXX", "CXXFLAGS"))]


def build(args) -> None:
    src = Path(args.dest).resolve()
    have = read_marker(src)
    if not have:
        raise UserError(f"{src} has no llama.cpp source; run 'make vendor' first")
    commit, patch_id = have[0], have[2]
    backend = args.backend
    nvcc = find_nvcc()
    if backend == "auto":  # nvcc alone is not enough: toolkits without a GPU often lack cuBLAS too
        backend = "cuda" if nvcc and has_nvidia_gpu() else "cpu"
    if backend == "cuda" and not nvcc:
        raise UserError("LLAMA_BACKEND=cuda but nvcc was not found (set CUDA_HOME or PATH)")
    cpu_flags = no_amx_cmake_flags()
    build_dir = cache_dir() / "llama.cpp-build" / f"{commit}-{patch_id}-{backend}{'-noamx' if cpu_flags else ''}"
    link = src / "build"
    bins = [build_dir / "bin" / t for t in TOOLS]
    complete = (build_dir / "BUILD_OK").exists()
    if all(b.exists() for b in bins) and complete:
        log(f"reusing the {backend} build of llama.cpp {commit} in {build_dir}")
    else:
        cmake_cache = build_dir / "CMakeCache.txt"
        same_tree = cmake_cache.exists() and f"CMAKE_HOME_DIRECTORY:INTERNAL={src}\n" in cmake_cache.read_text()
        if not (complete and same_tree):
            # half-finished, or configured from another clone's tree (CMake cannot add a target to that one):
            # start clean; a complete build of this tree that only lacks a newer tool is built on
            shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True, exist_ok=True)
        logpath = Path(args.log).resolve()
        logpath.parent.mkdir(parents=True, exist_ok=True)
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_UI=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", *cpu_flags]
        if backend == "cuda":
            flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
            if os.environ.get("CUDA_ARCHITECTURES"):
                flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CUDA_ARCHITECTURES']}")
        jobs = str(args.jobs or os.cpu_count() or 2)
        steps = [
            ("cmake configure", ["cmake", "-S", str(src), "-B", str(build_dir), *flags]),
            ("cmake build", ["cmake", "--build", str(build_dir), "-j", jobs, "--target", *TOOLS]),
        ]
        log(f"building {', '.join(TOOLS)} ({backend}, -j{jobs}); about 10 minutes on 2 cores, a CUDA build 6 on 16; "
            f"log: {logpath}")
        with open(logpath, "a") as logf:
            for name, cmd in steps:
                print("$ " + " ".join(cmd), file=logf, flush=True)
                r = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT)
                if r.returncode != 0:
                    tail = logpath.read_text(errors="replace").splitlines()[-15:]
                    print("\n".join(tail), file=sys.stderr)
                    raise UserError(f"llama.cpp {name} failed (exit {r.returncode}); full log: {logpath}")
        (build_dir / "BUILD_OK").write_text(f"{commit} {backend}\n")
    if link.is_symlink() or link.exists():
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            shutil.rmtree(link)
    link.symlink_to(build_dir, target_is_directory=True)
    log(f"llama.cpp tools ready in {link}/bin")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["fetch", "build"], help="fetch the source, or build the tools")
    p.add_argument("--dest", default=str(ROOT / "vendor" / "llama.cpp"), help="where the source goes")
    p.add_argument("--commit", default=DEFAULT_COMMIT, help="llama.cpp commit to pin (default %(default)s)")
    p.add_argument("--repo", default=DEFAULT_REPO, help="git URL of llama.cpp")
    p.add_argument("--patches", default=str(PATCH_DIR), help="folder of *.patch files applied after fetching "
                   "(default: %(default)s)")
    p.add_argument("--backend", choices=["auto", "cpu", "cuda"], default="auto", help="build backend")
    p.add_argument("--jobs", type=int, default=0, help="parallel build jobs (default: all cores)")
    p.add_argument("--log", default=str(ROOT / "out" / "logs" / "llama.cpp.log"), help="log file")
    args = p.parse_args()
    if args.action == "fetch":
        fetch(args)
    else:
        build(args)


if __name__ == "__main__":
    run_main(main)
