"""Who holds a port: a free port, the background server of a pid file, or something else."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from lib.common import UserError


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def read_pid(pid_file: Path) -> dict | None:
    """The pid file's record ({pid, host, port, model, model_mtime}) if that process is still alive."""
    try:
        info = json.loads(Path(pid_file).read_text())
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError, TypeError):
        return None


def require_port_free(host: str, port: int, pid_file: Path | None) -> None:
    """One error line if host:port is taken by anything but the server of pid_file (which make restarts or
    keeps, so its port counts as free)."""
    ours = read_pid(pid_file) if pid_file else None
    if ours and ours.get("port") == port and ours.get("host") == host:
        return
    if port_in_use(host, port):
        raise UserError(f"port {port} on {host} is already in use; stop what uses it or choose PORT=...")
