#!/usr/bin/env python3
"""Put the sha256 of web/index.html's inline script into its Content-Security-Policy (run after editing the script).

The page is one file (llama-server answers only "/" without the API key), so its script is inline; the CSP lets
that script run, by its hash, and nothing else: no injected script or event handler, nothing from elsewhere.
  web_csp.py            rewrite the hash in place when it is stale
  web_csp.py --check    exit 1, naming the right hash, when it is stale
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/, for lib
from lib.common import ROOT, UserError, log, run_main  # noqa: E402

PAGE = ROOT / "web" / "index.html"
CSP_HASH = re.compile(r"script-src 'sha256-([^']*)'")


def script_hash(html: str) -> str:
    """The CSP hash of the page's one inline script: base64 of the sha256 of the text between its tags."""
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    if len(scripts) != 1:
        raise UserError(f"expected one inline <script> in the page, found {len(scripts)}")
    return base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--page", type=Path, default=PAGE)
    p.add_argument("--check", action="store_true", help="only check; exit 1 when the hash is stale")
    args = p.parse_args()
    html = args.page.read_text(encoding="utf-8")
    found = CSP_HASH.search(html)
    if not found:
        raise UserError(f"{args.page} has no script-src 'sha256-...' in its Content-Security-Policy")
    want = script_hash(html)
    if found.group(1) == want:
        log(f"{args.page}: the CSP hash is current")
        return 0
    if args.check:
        raise UserError(f"{args.page}: the CSP names sha256-{found.group(1)}, the script is sha256-{want} "
                        f"(run scripts/tools/web_csp.py)")
    tmp = args.page.with_name(args.page.name + ".tmp")
    tmp.write_text(html[:found.start(1)] + want + html[found.end(1):], encoding="utf-8")
    tmp.replace(args.page)
    log(f"{args.page}: CSP hash set to sha256-{want}")
    return 0


if __name__ == "__main__":
    run_main(main)
