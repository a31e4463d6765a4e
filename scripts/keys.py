#!/usr/bin/env python3
"""Keys for a shared server (llama-server with patches/llama.cpp/0015): add a tenant's key, have the server reread.

  keys.py add --file out/keys.txt --tenant acme --models 'acme-*'
      prints a new random key once; only its sha256 is appended to the file (made 0600 if missing)
  keys.py reload --url http://127.0.0.1:8080 --admin-key-file out/admin.key
      the running server reads the keys file now (it also does by itself when the file changes)
The file's format: scripts/lib/keys.py and docs/guide.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import ROOT, UserError, log, run_main  # noqa: E402
from lib.keys import add_key, read_admin_key  # noqa: E402


def reload(url: str, admin_key_file: Path) -> str:
    req = urllib.request.Request(url + "/keys/reload", data=b"{}", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {read_admin_key(admin_key_file)}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["message"]
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            body = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise UserError(f"the server refused the reload: {e.code} {body}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise UserError(f"cannot reach the server at {url} ({e})") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["add", "reload"])
    p.add_argument("--file", type=Path, default=ROOT / "out" / "keys.txt", help="the keys file (KEYS_FILE)")
    p.add_argument("--tenant", help="add: the tenant's name (letters, digits, - _ .)")
    p.add_argument("--models", help="add: the models the key may use: names or globs, comma-separated ('*': all)")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="reload: the server")
    p.add_argument("--admin-key-file", type=Path, default=ROOT / "out" / "admin.key", help="reload: its admin key")
    args = p.parse_args()
    if args.action == "add":
        if not args.tenant:
            raise UserError("add needs --tenant (make key TENANT=acme MODELS='acme-*')")
        key = add_key(args.file, args.tenant, args.models or "")
        print(key)
        log(f"added a key for {args.tenant} to {args.file} (only its hash is kept: save the key now); a running "
            f"server with this keys file takes it at the next request")
    else:
        log(reload(args.url, args.admin_key_file))


if __name__ == "__main__":
    run_main(main)
