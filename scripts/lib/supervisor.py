#!/usr/bin/env python3
"""Keep the replicas and their balancer running: start them, restart what dies, roll them over to a new model.

  supervisor.py --spec out/server.replicas/spec.json

serve.py (lib/replicas.py) writes the spec and starts this in the background. It starts every engine in the
spec, waits for each one's /health, then HAProxy (lib/balancer.py) in front, and writes state.json beside the
spec (phase, generation, each replica's pid, port, model, start time, restarts, status) for serve.py and
`make status`. Then, every fraction of a second:
  - an engine that exited (a crash, kill -9) is started again on its port (after 1, 2, 4 ... 30 s when it keeps
    dying); HAProxy's health checks take it out meanwhile and back in when it answers;
  - HAProxy, if it exited, is started again;
  - on SIGHUP it reads the spec again and rolls the replicas over to it one at a time: maint (runtime API:
    no new request, not even one stuck to it), wait until HAProxy counts no request in flight on it, stop, start with the new command, wait for
    /health, ready, wait until HAProxy has it UP, next one. The others serve meanwhile.
SIGTERM or SIGINT stop HAProxy and every engine (each child also gets SIGTERM if this process dies).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for lib
from lib import balancer  # noqa: E402
from lib.common import UserError, run_main  # noqa: E402

EVENTS_KEPT = 40


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the supervisor dies (no orphaned engines)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def slots(cmd: list[str]) -> int:
    """The engine's parallel slots (-np; llama-server's default is 4)."""
    for flag in ("-np", "--parallel"):
        if flag in cmd[:-1]:
            value = cmd[cmd.index(flag) + 1]
            if value.isdigit() and int(value) > 0:
                return int(value)
    return 4


def say(msg: str) -> None:
    print(f"[supervisor {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Engine:
    """One replica: its llama-server process on its loopback port."""

    def __init__(self, r: dict):
        self.name, self.port = r["name"], r["port"]
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.restarts = 0
        self.deaths: list[float] = []
        self.next_start = 0.0
        self.status = "stopped"
        self.configure(r)

    def configure(self, r: dict) -> None:
        self.cmd, self.env, self.cpus = r["cmd"], r.get("env", {}), r.get("cpus", [])
        self.model, self.log = r["model"], Path(r["log"])

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cpus = self.cpus

        def child_setup() -> None:
            die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        with open(self.log, "ab") as logf:
            logf.write(("$ " + " ".join(self.cmd) + "\n").encode())
            logf.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env}, preexec_fn=child_setup)
        self.started, self.status = time.time(), "starting"

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=timeout) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc else 0

    def stop(self, timeout: float = 15) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.status = "stopped"

    def record(self) -> dict:
        return {"name": self.name, "port": self.port, "pid": self.proc.pid if self.proc else None,
                "model": self.model, "started": self.started, "restarts": self.restarts, "status": self.status,
                "where": (f"GPU {self.env['CUDA_VISIBLE_DEVICES']}" if self.env.get("CUDA_VISIBLE_DEVICES")
                          else f"CPU {','.join(map(str, self.cpus))}" if self.cpus else "")}


class Supervisor:
    def __init__(self, spec_path: Path):
        self.spec_path = spec_path
        self.spec = json.loads(spec_path.read_text())
        self.dir = Path(self.spec["dir"])
        self.engines = [Engine(r) for r in self.spec["replicas"]]
        self.runtime = balancer.Runtime(Path(self.spec["socket"]))
        self.haproxy: subprocess.Popen | None = None
        self.phase, self.error, self.generation = "starting", None, self.spec.get("generation", 1)
        self.events: list[str] = []
        self.stopping = self.reload = False

    # ---- state for serve.py and make status ----
    def event(self, msg: str) -> None:
        say(msg)
        self.events = (self.events + [msg])[-EVENTS_KEPT:]
        self.write_state()

    def write_state(self) -> None:
        state = {"pid": os.getpid(), "phase": self.phase, "error": self.error, "generation": self.generation,
                 "balancer_pid": self.haproxy.pid if self.haproxy else None,
                 "replicas": [e.record() for e in self.engines],
                 "remote": [{**r, "status": "remote"} for r in self.spec["remote"]], "events": self.events,
                 "updated": time.time()}
        tmp = self.dir / f".state.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(self.dir / "state.json")

    # ---- the balancer ----
    def start_haproxy(self) -> None:
        config = self.dir / "haproxy.cfg"
        servers = [(e.name, f"127.0.0.1:{e.port}", slots(e.cmd)) for e in self.engines]
        # a remote engine's slots are not known here: the local ones' (serve.py's defaults for this machine)
        servers += [(r["name"], r["addr"], r.get("slots") or slots(self.engines[0].cmd)) for r in self.spec["remote"]]
        host, port = self.spec["bind"]
        config.write_text(balancer.render(host, port, servers, Path(self.spec["socket"]), self.spec["affinity"],
                                          self.spec.get("check_interval_ms", 1000)))
        balancer.check_config(self.spec["haproxy"], config)
        Path(self.spec["socket"]).unlink(missing_ok=True)
        log = Path(self.spec["balancer_log"])
        with open(log, "ab") as logf:
            self.haproxy = subprocess.Popen([self.spec["haproxy"], "-db", "-f", str(config)], stdout=logf,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            preexec_fn=die_with_parent)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.haproxy.poll() is not None:
                raise UserError(f"haproxy exited with code {self.haproxy.returncode} (log: {log})")
            try:
                live = self.runtime.servers()
                if all(live.get(e.name, {}).get("status") == "UP" for e in self.engines):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise UserError(f"haproxy did not see the replicas UP within 15 s (log: {log})")

    # ---- start, watch, stop ----
    def start_all(self) -> None:
        for e in self.engines:
            e.start()
        self.event(f"started {len(self.engines)} engine(s); waiting for /health")
        deadline = time.monotonic() + self.spec["timeout"]
        waiting = list(self.engines)
        while waiting:
            for e in list(waiting):
                if (code := e.exited()) is not None:
                    raise UserError(f"replica {e.name} exited with code {code} before it was ready (log: {e.log})")
                if e.healthy():
                    e.status = "up"
                    waiting.remove(e)
                    self.event(f"{e.name} healthy on 127.0.0.1:{e.port} after {time.time() - e.started:.1f} s")
            if time.monotonic() > deadline:
                raise UserError(f"replica(s) {', '.join(e.name for e in waiting)} not healthy within "
                                f"{self.spec['timeout']:.0f} s (log: {waiting[0].log})")
            if self.stopping:
                raise UserError("stopped while starting")
            time.sleep(0.2)
        self.start_haproxy()
        self.event(f"haproxy on {self.spec['bind'][0]}:{self.spec['bind'][1]} (pid {self.haproxy.pid})")

    def watch(self, skip: Engine | None = None) -> None:
        """Restart what died (not `skip`, which a rollout is handling); mark restarted engines up when healthy."""
        now = time.time()
        for e in self.engines:
            if e is skip:
                continue
            code = e.exited()
            if code is not None and e.status != "waiting":
                e.deaths = [t for t in e.deaths if now - t < 60] + [now]
                delay = min(30, 2 ** (len(e.deaths) - 1)) if len(e.deaths) > 1 else 0
                e.next_start, e.status = now + delay, "waiting"
                self.event(f"{e.name} (pid {e.proc.pid}) exited with code {code}; restarting"
                           + (f" in {delay} s" if delay else ""))
            if e.status == "waiting" and now >= e.next_start:
                e.restarts += 1
                e.start()
                self.write_state()
            elif e.status == "starting" and e.healthy(0.5):
                e.status = "up"
                self.event(f"{e.name} healthy again (pid {e.proc.pid}, restart {e.restarts})")
        if self.haproxy and self.haproxy.poll() is not None and not self.stopping:
            self.event(f"haproxy exited with code {self.haproxy.returncode}; restarting it")
            self.start_haproxy()

    def stop_all(self) -> None:
        if self.haproxy and self.haproxy.poll() is None:
            self.haproxy.terminate()
        for e in self.engines:
            if e.proc and e.proc.poll() is None:
                e.proc.terminate()
        deadline = time.monotonic() + 6
        for p in [self.haproxy] + [e.proc for e in self.engines]:
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for e in self.engines:
            e.status = "stopped"
        Path(self.spec["socket"]).unlink(missing_ok=True)

    # ---- rolling update ----
    def wait(self, what: str, done, timeout: float, skip: Engine) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise UserError(f"timed out after {timeout:.0f} s waiting for {what}")
            if self.stopping:
                raise UserError("stopped during the rolling update")
            self.watch(skip)
            time.sleep(0.1)

    def in_flight(self, name: str) -> int:
        try:
            return self.runtime.servers().get(name, {}).get("in_flight", 0)
        except OSError:
            return 0

    def rollout(self) -> None:
        spec = json.loads(self.spec_path.read_text())
        generation = spec.get("generation", self.generation + 1)
        self.phase = "rolling"
        self.event(f"rolling update to generation {generation}: {len(self.engines)} replica(s), one at a time")
        for e, r in zip(self.engines, spec["replicas"]):
            old = {"cmd": e.cmd, "env": e.env, "cpus": e.cpus, "model": e.model, "log": str(e.log)}
            e.status = "draining"
            # maint, not drain: a drained server still takes the requests stuck to it (affinity); in maint it takes
            # no new request while those in flight run to their end
            self.runtime.set_state(e.name, "maint")
            self.event(f"{e.name}: draining ({self.in_flight(e.name)} request(s) in flight)")
            self.wait(f"{e.name}'s requests in flight", lambda: self.in_flight(e.name) == 0, 3600, e)
            e.stop()
            e.configure(r)
            e.start()
            try:
                self.wait(f"{e.name} to answer /health", lambda: e.exited() is None and e.healthy(), 
                          self.spec["timeout"], e)
            except UserError as err:
                self.event(f"{e.name}: the new model did not come up ({err}); back to the old one")
                e.stop()
                e.configure(old)
                e.start()
                self.wait(f"{e.name} (old model) to answer /health", lambda: e.exited() is None and e.healthy(),
                          self.spec["timeout"], e)
                self.runtime.set_state(e.name, "ready")
                raise UserError(f"rolling update stopped: {e.name} did not start on the new model "
                                f"(log: {e.log}); the replicas not yet replaced serve the old one")
            self.runtime.set_state(e.name, "ready")
            self.wait(f"haproxy to see {e.name} UP",
                      lambda: self.runtime.servers().get(e.name, {}).get("status") == "UP", 60, e)
            e.status = "up"
            self.event(f"{e.name}: serving {Path(e.model).name} again after {time.time() - e.started:.1f} s")
        self.spec = spec
        self.generation, self.phase = generation, "ready"
        self.event(f"rolling update to generation {generation} done")

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.on_stop)
        signal.signal(signal.SIGINT, self.on_stop)
        signal.signal(signal.SIGHUP, self.on_reload)
        try:
            self.start_all()
            self.phase = "ready"
            self.event(f"ready: {len(self.engines)} replica(s)"
                       + (f" + {len(self.spec['remote'])} remote" if self.spec["remote"] else ""))
            while not self.stopping:
                if self.reload:
                    self.reload = False
                    try:
                        self.rollout()
                    except UserError as err:
                        self.generation = json.loads(self.spec_path.read_text()).get("generation")
                        self.phase, self.error = "failed-rollout", str(err)
                        self.event(str(err))
                self.watch()
                time.sleep(0.2)
        except UserError as err:
            self.phase, self.error = "failed", str(err)
            self.event(str(err))
        finally:
            self.stop_all()
            if self.phase != "failed":
                self.phase = "stopped"
            self.write_state()
            say("stopped")

    def on_stop(self, *_):
        self.stopping = True

    def on_reload(self, *_):
        self.reload = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, required=True, help="the spec lib/replicas.py wrote")
    args = p.parse_args()
    if not args.spec.exists():
        raise UserError(f"no spec file {args.spec}")
    Supervisor(args.spec).run()


if __name__ == "__main__":
    run_main(main)
