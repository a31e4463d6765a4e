"""Keys for a shared server: the keys file's format, key hashes, new keys, the admin key file.

The keys file (KEYS_FILE, read by llama-server's --keys-file, patches/llama.cpp/0015) has one key a line:

    sha256:<64 hex digits> tenant=<name> models=<pattern>[,<pattern>...]   # comment

The hash is sha256 of the key as the client sends it (Authorization: Bearer <key>); the key itself is stored
nowhere. A pattern is a model name or a glob (acme-*, *); the base model is named by its alias. Blank lines and
'#' comments are skipped. The server reads the file again when it changes.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
from pathlib import Path

from lib.common import UserError

NAME = re.compile(r"^[A-Za-z0-9._-]+$")
PATTERN = re.compile(r"^[A-Za-z0-9._*?\[\]!-]+$")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A random key (256 bits), prefixed so that it is recognisable in a config or a leak scan."""
    return "lsk-" + secrets.token_urlsafe(32)


def check_tenant(tenant: str) -> str:
    if not NAME.match(tenant or ""):
        raise UserError(f"tenant must be letters, digits, '-', '_' or '.', not {tenant!r} (make key TENANT=acme ...)")
    return tenant


def parse_models(models: str) -> list[str]:
    """'acme-*,smollm2' -> ['acme-*', 'smollm2']; spaces also separate."""
    patterns = [p for p in re.split(r"[,\s]+", models or "") if p]
    if not patterns:
        raise UserError("a key needs the models it may use: MODELS='acme-*' (names or globs, comma-separated; "
                        "'*' for every model)")
    for p in patterns:
        if not PATTERN.match(p):
            raise UserError(f"model pattern {p!r}: use letters, digits, '.', '_', '-' and the globs * ? [...]")
    return patterns


def parse_line(line: str, where: str) -> dict | None:
    """One line of a keys file as {hash, tenant, models}, None for a blank or comment line; UserError naming where."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    first, *fields = text.split()
    if not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", first):
        raise UserError(f"{where}: expected sha256:<64 hex digits> first, got {first[:80]!r}")
    entry = {"hash": first.lower()}
    for field in fields:
        key, eq, value = field.partition("=")
        if not eq or key not in ("tenant", "models"):
            raise UserError(f"{where}: expected tenant=... and models=..., got {field[:80]!r}")
        entry[key] = value
    if "tenant" not in entry or "models" not in entry:
        raise UserError(f"{where}: needs tenant= and models=")
    check_tenant(entry["tenant"])
    entry["models"] = [p for p in entry["models"].split(",")]
    if not all(entry["models"]):
        raise UserError(f"{where}: empty model pattern")
    return entry


def read_keys_file(path: Path) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"keys file {path} cannot be read ({e.strerror})") from None
    entries = [parse_line(line, f"{path} line {i}") for i, line in enumerate(lines, 1)]
    return [e for e in entries if e]


def write_private(path: Path, text: str) -> None:
    """Write text to path readable by its owner only (0600), all at once (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_key(path: Path, tenant: str, models: str) -> str:
    """A new random key for tenant, its hash appended to the keys file (made if missing, 0600); the key."""
    check_tenant(tenant)
    patterns = parse_models(models)
    path = Path(path)
    old = path.read_text() if path.exists() else ("# lora-ship keys: sha256 of each key, its tenant, the models it may "
                                                   "use (docs/guide.md)\n")
    if path.exists():
        read_keys_file(path)  # refuse to append to a file the server would not read
    key = new_key()
    line = f"{hash_key(key)} tenant={tenant} models={','.join(patterns)}\n"
    write_private(path, old + ("" if old.endswith("\n") or not old else "\n") + line)
    return key


def admin_key(path: Path, given: str | None) -> str:
    """The admin key the server starts with: `given` (ADMIN_KEY) or a new random one, written to path (0600) so that
    this project's own admin calls (the hot-add of `make serve-adapters`, `make keys-reload`) can read it."""
    if given is not None and len(given) < 16:
        raise UserError("ADMIN_KEY must be at least 16 characters (or leave it unset: one is generated)")
    key = given or new_key()
    write_private(Path(path), key + "\n")
    return key


def read_admin_key(path: Path) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise UserError(f"no admin key at {path} ({e.strerror}): is the server running ('make serve-adapters')?") from None
