"""HAProxy in front of the replicas: its configuration (rendered from a template) and its runtime API.

The balancer is Debian's haproxy (2.6), not a proxy written here. One frontend on HOST:PORT; the backend `be`
balances by least outstanding requests (`leastconn` counts a server's requests in flight), checks each
replica's GET /health, retries a request that got no byte of answer on another replica (`retry-on` +
`option redispatch`) and passes responses through as they come (HAProxy does not buffer a response; streams
reach the client token by token). Headers pass through untouched, so each llama-server checks the
`Authorization` key itself, exactly as on one server.

Affinity (on by default): a request that names its conversation (header X-Session-Id, or the OpenAI `user`
field of a JSON body) sticks to the replica that answered that conversation's first request (a stick table),
so one conversation keeps hitting the replica that holds its prompt cache. A replica that is down or drained
is not stuck to: the request goes, by least outstanding requests, to another one, which the conversation
then keeps. It is the same backend and the same servers: one health check per engine and one `maxconn` bound
on each engine's requests, named or not. Only requests with a body are buffered for the `user` field (the
request, never the response).

The runtime API (a stats socket) drains, readies and reads servers: `set server be/r0 state drain`,
`show stat`.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import socket
from pathlib import Path

from .common import UserError

BACKENDS = ("be",)
SESSION_HEADER = "X-Session-Id"

TEMPLATE = """\
# written by scripts/lib/balancer.py; regenerated at every start
global
    stats socket {socket} mode 600 level admin expose-fd listeners
    stats timeout 30s
    log stdout format raw local0 {log_level}
    # room for a request body to be kept for a retry (requests larger than this are not retried)
    tune.bufsize 65536

defaults
    mode http
    log global
    option httplog
    option dontlognull
    # a new connection to the engine for each request, closed after its answer: no idle connection is kept
    # that a restarted engine has since dropped (a rollout's 502), and none holds one of the engine's HTTP
    # threads between requests (its /health answers); on loopback a connection costs tens of microseconds
    option http-server-close
    # forward each streamed chunk at once (no MSG_MORE / Nagle merging of small writes): without it a stream of
    # tokens through HAProxy arrived in bursts, 8 streaming clients at 74% of the engine alone
    option http-no-delay
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout http-request 60s
    # requests beyond a replica's slots wait here (see maxconn), as long as they would in the engine
    timeout queue 1h
    # a busy engine on a loaded machine can take more than a second to answer /health
    timeout check 5s
    # a request that had no byte of answer (refused connection, a replica killed before it answered) is sent
    # again, to another replica
    retries 3
    retry-on conn-failure empty-response response-timeout
    option redispatch 1

frontend fe
    bind {bind}
{affinity_frontend}    default_backend be

backend be
    balance leastconn
{affinity_backend}{backend_common}
{servers}
"""

BACKEND_COMMON = """\
    option httpchk GET /health
    http-check expect status 200
    default-server check inter {inter} fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down"""

AFFINITY_FRONTEND = """\
    # a conversation's name: the X-Session-Id header, else the JSON body's "user" (only requests with a body
    # are buffered, and only the request)
    http-request set-var(txn.session) req.hdr({header}) if {{ req.hdr({header}) -m found }}
    option http-buffer-request
    acl named var(txn.session) -m found
    http-request set-var(txn.session) req.body,json_query('$.user') if !named {{ req.body_size gt 0 }}
"""

AFFINITY_BACKEND = """\
    # a named conversation goes back to the replica that answered it first, while that one is up and not drained
    stick-table type string len 128 size 1m expire 2h
    stick on var(txn.session)
"""


def find_haproxy() -> str:
    """The haproxy binary (LORA_SHIP_HAPROXY names another: tests use it to see the missing-binary error)."""
    if "LORA_SHIP_HAPROXY" in os.environ:
        path = os.environ["LORA_SHIP_HAPROXY"]
        if Path(path).is_file() and os.access(path, os.X_OK):
            return path
        raise UserError("no load balancer: haproxy is not installed (apt-get install haproxy)")
    path = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                            if Path(p).exists()), None)
    if not path:
        raise UserError("no load balancer: haproxy is not installed (apt-get install haproxy)")
    return path


def render(bind_host: str, bind_port: int, servers: list[tuple[str, str, int]], socket_path: Path,
           affinity: bool = True, check_interval_ms: int = 1000, log_level: str = "info") -> str:
    """The configuration: servers is [(name, "host:port", slots)]. Each server takes at most its slots' worth of
    requests at once (maxconn); the rest wait in HAProxy's queue and go to the first replica with a free slot.
    So the engine's own HTTP threads (slots + 2) always have one free for /health, which would otherwise wait
    behind queued requests and fail the check of a merely busy replica."""
    host = f"[{bind_host}]" if ":" in bind_host else bind_host
    lines = "\n".join(f"    server {name} {addr} maxconn {slots}" for name, addr, slots in servers)
    common = BACKEND_COMMON.format(inter=f"{check_interval_ms}ms")
    return TEMPLATE.format(
        socket=socket_path, log_level=log_level, bind=f"{host}:{bind_port}", servers=lines, backend_common=common,
        affinity_frontend=AFFINITY_FRONTEND.format(header=SESSION_HEADER) if affinity else "",
        affinity_backend=AFFINITY_BACKEND if affinity else "")


def check_config(haproxy: str, config: Path) -> None:
    import subprocess
    # not -q: it hides the alerts too, leaving nothing to say why
    r = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True)
    if r.returncode != 0:
        lines = (r.stderr + r.stdout).splitlines()
        alert = next((l for l in lines if "[ALERT]" in l), None) or next((l for l in lines if l.strip()), "?")
        raise UserError(f"haproxy rejected {config}: {alert.split(' : ', 2)[-1].strip()}")


class Runtime:
    """HAProxy's runtime API over its stats socket (one command per connection)."""

    def __init__(self, socket_path: Path):
        self.socket_path = str(socket_path)

    def command(self, cmd: str, timeout: float = 5) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.socket_path)
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def set_state(self, server: str, state: str, backends: tuple[str, ...] = BACKENDS) -> None:
        """state: ready, drain or maint, for `server` in each backend that has it."""
        for be in backends:
            out = self.command(f"set server {be}/{server} state {state}").strip()
            if out and "No such backend" not in out and "No such server" not in out:
                raise UserError(f"haproxy refused 'set server {be}/{server} state {state}': {out}")

    def stats(self) -> list[dict]:
        """`show stat` as rows (dicts by column: pxname, svname, status, scur, stot, hrsp_2xx, ...)."""
        text = self.command("show stat")
        return list(csv.DictReader(io.StringIO(text.lstrip("# "))))

    def servers(self) -> dict[str, dict]:
        """server name -> {status, in_flight, served, by backend}: status from the main backend, in_flight and
        served summed over the backends (both balance the same engines)."""
        out: dict[str, dict] = {}
        for row in self.stats():
            if row.get("pxname") not in BACKENDS or row.get("svname") in ("FRONTEND", "BACKEND"):
                continue
            s = out.setdefault(row["svname"], {"status": "", "in_flight": 0, "served": 0, "addr": row.get("addr", "")})
            if row["pxname"] == "be":
                s["status"] = row.get("status", "")
            s["in_flight"] += int(row.get("scur") or 0)
            s["served"] += sum(int(row.get(f"hrsp_{k}xx") or 0) for k in range(1, 6))
        return out
