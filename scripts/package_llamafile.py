#!/usr/bin/env python3
"""Package the GGUF as one self-contained executable: the llamafile binary with the model and its default
arguments embedded, runnable as `./model.llamafile --server` (or with no flags for llamafile's own default).

This is what llamafile's `zipalign -j0 out.llamafile model.gguf .args` does: the llamafile binary is also a
ZIP archive, and the GGUF and an `.args` file (one argument per line; `...` marks where the user's own
arguments go) are appended to it uncompressed, the GGUF's bytes aligned to 64 KiB so llamafile can mmap them
in place. Here Python's zipfile writes them (alignment padding in the local header's extra field), so no
zipalign binary is needed. The result is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import ROOT, UserError, atomic_file, log, require_free_space, run_main  # noqa: E402

ALIGN = 65536  # covers 4 KiB, 16 KiB and 64 KiB pages
PAD_ID = 0xD935  # extra-field id used by Android's zipalign for padding; readers skip unknown ids


def default_args(model_name: str, host: str, port: int, gpu_layers: str) -> str:
    return "\n".join(["-m", model_name, "--host", host, "--port", str(port), "-ngl", gpu_layers, "..."]) + "\n"


def add_aligned(zf: zipfile.ZipFile, src: Path, name: str) -> None:
    """Append src stored (uncompressed) with its data starting at a multiple of ALIGN in the file."""
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    size = src.stat().st_size
    zip64 = size >= zipfile.ZIP64_LIMIT
    header_at = zf.start_dir  # where zipfile writes the next local header (absolute: after the binary)
    # local header (30) + name + our extra + the zip64 extra zipfile adds for big files (20)
    fixed = header_at + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -fixed % ALIGN
    info.extra = struct.pack("<HH", PAD_ID, pad) + b"\0" * pad
    with open(src, "rb") as f, zf.open(info, "w", force_zip64=zip64) as out:
        shutil.copyfileobj(f, out, 16 << 20)


def data_offset(path: Path, name: str) -> int:
    """Where the stored bytes of `name` begin in the file (from its local header)."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        info = zf.getinfo(name)
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len


def package(binary: Path, model: Path, out: Path, args_text: str) -> None:
    require_free_space(out.parent, binary.stat().st_size + model.stat().st_size + ALIGN, "the llamafile")
    with atomic_file(out) as tmp:
        shutil.copyfile(binary, tmp)
        with zipfile.ZipFile(tmp, "a") as zf:
            args_file = tmp.with_name(tmp.name + ".args")
            args_file.write_text(args_text)
            try:
                add_aligned(zf, args_file, ".args")
            finally:
                args_file.unlink()
            add_aligned(zf, model, model.name)
        if data_offset(tmp, model.name) % ALIGN:
            raise UserError("internal error: the embedded GGUF is not aligned")
        tmp.chmod(0o755)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the GGUF to embed")
    p.add_argument("--out", type=Path, required=True, help="the .llamafile to write")
    p.add_argument("--llamafile", type=Path, default=ROOT / "vendor" / "llamafile" / "bin" / "llamafile",
                   help="the llamafile release binary (make llamafile)")
    p.add_argument("--host", default="127.0.0.1", help="default --host baked into .args")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--gpu-layers", default="999", help="default -ngl (llamafile runs on the CPU without a GPU)")
    args = p.parse_args()
    if not args.model.exists():
        raise UserError(f"model file {args.model} does not exist (run 'make quantize')")
    if not (args.llamafile.exists() and os.access(args.llamafile, os.X_OK)):
        raise UserError(f"no llamafile binary at {args.llamafile}: 'make llamafile' needs GitHub and a pinned "
                        f"LLAMAFILE_SHA256 (offline, 'make serve' uses llama-server instead)")
    package(args.llamafile, args.model, args.out, default_args(args.model.name, args.host, args.port,
                                                               args.gpu_layers))
    log(f"wrote {args.out}: run it with ./{args.out.name} --server (listens on {args.host}:{args.port})")


if __name__ == "__main__":
    run_main(main)
