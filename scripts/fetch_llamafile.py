#!/usr/bin/env python3
"""Get llamafile: its source at a pinned tag (vendor/llamafile/src) and its release binary
(vendor/llamafile/bin/llamafile), checked against a pinned sha256 before it is made executable.

Neither is required: where GitHub cannot be reached, or no sha256 is pinned, this says so in one line
and exits 0, and `make serve` uses llama.cpp's llama-server, which has the same HTTP API.
--once (what plain `make` passes): nothing is tried or said again once it was (a marker in --dest per
version and sha256), no binary is downloaded without a sha256 to check it against, and a failed source clone
is not mentioned (nothing needs it): `make` says at most one line about llamafile, the first time.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import ROOT, UserError, atomic_file, log, run_main  # noqa: E402

REPO = "https://github.com/Mozilla-Ocho/llamafile"


class Unpinned(Exception):
    """The download worked but there is no sha256 to check it against."""


def clone_source(version: str, dest: Path, quiet: bool = False) -> None:
    if (dest / ".git").exists():
        return
    r = subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", version, REPO, str(dest)],
                       env=dict(os.environ, GIT_TERMINAL_PROMPT="0"), capture_output=True, text=True)
    if r.returncode != 0 and not quiet:
        log(f"llamafile source {version} not cloned (GitHub unreachable?); not needed to serve")


def tried_before(marker: Path) -> bool:
    """True if marker exists; else creates it (so the next --once run stays quiet) and returns False."""
    if marker.exists():
        return True
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return False


def download_binary(version: str, sha256: str, dest: Path) -> None:
    if dest.exists() and sha256 and hashlib.sha256(dest.read_bytes()).hexdigest() == sha256:
        log(f"llamafile {version} already in {dest}")
        return
    url = f"{REPO}/releases/download/{version}/llamafile-{version}"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, atomic_file(dest) as tmp:
            h = hashlib.sha256()
            with open(tmp, "wb") as f:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    f.write(chunk)
                    h.update(chunk)
            digest = h.hexdigest()
            if not sha256:
                raise Unpinned(digest)
            if digest != sha256:
                raise UserError(f"sha256 mismatch for llamafile {version}: got {digest}, pinned {sha256}")
            tmp.chmod(0o755)
    except Unpinned as e:
        log(f"llamafile {version} downloaded but not installed: its sha256 is {e}, and none is pinned; check it "
            f"against the release page and set LLAMAFILE_SHA256 to install it (serving uses llama-server)")
        return
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        log(f"llamafile {version} not downloaded ({reason}); 'make serve' will use llama-server instead")
        return
    log(f"llamafile {version} ready in {dest}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default="0.9.3", help="llamafile release tag (default %(default)s)")
    p.add_argument("--sha256", default="", help="pinned sha256 of the release binary")
    p.add_argument("--dest", type=Path, default=ROOT / "vendor" / "llamafile")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--source-only", action="store_true", help="only clone the source")
    only.add_argument("--binary-only", action="store_true", help="only download the binary")
    p.add_argument("--once", action="store_true", help="try and say each thing once (see above); no unpinned download")
    args = p.parse_args()
    sha256 = args.sha256.strip().lower()
    binary = args.dest / "bin" / "llamafile"
    if not args.binary_only and not (args.once and tried_before(args.dest / f".tried-source-{args.version}")):
        clone_source(args.version, args.dest / "src", quiet=args.once)
    if args.source_only or (args.once and tried_before(args.dest / f".tried-binary-{args.version}-{sha256 or 'none'}")):
        return
    if args.once and not sha256:
        log(f"llamafile {args.version} not installed: no LLAMAFILE_SHA256 is pinned ('make llamafile' downloads it "
            f"and prints its sha256 to check); llama-server serves, with the same API")
        return
    try:
        download_binary(args.version, sha256, binary)
    except UserError:  # a wrong checksum is said every time, --once or not
        (args.dest / f".tried-binary-{args.version}-{sha256 or 'none'}").unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    run_main(main)
