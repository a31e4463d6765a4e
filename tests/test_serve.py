"""Serving failures: a busy port, a server that cannot start, a public bind without a key."""
import socket

from conftest import needs_llama_cpp
from helpers import LLAMA_SERVER, error_line, free_port, run_script

pytestmark = needs_llama_cpp


def start(*args, check=False):
    return run_script("serve.py", "start", "--background", "--engine", "llama-server", "--llama-server",
                      LLAMA_SERVER, *args, check=check)


def test_port_already_in_use(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start("--model", gguf, "--port", port, "--pid-file", tmp_path / "pid")
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in error_line(proc)
    assert not (tmp_path / "pid").exists()


def test_server_that_fails_to_come_up_shows_its_log(tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    log = tmp_path / "server.log"
    proc = start("--model", gguf, "--port", free_port(), "--pid-file", tmp_path / "pid", "--log", log)
    assert proc.returncode == 1
    assert "exited with code" in error_line(proc) and str(log) in error_line(proc)
    assert "last lines of the server log" in proc.stderr
    assert not (tmp_path / "pid").exists()


def test_public_bind_needs_an_api_key(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    proc = start("--model", gguf, "--host", "0.0.0.0", "--port", free_port(), "--api-key", "")
    assert proc.returncode == 1 and "without an API key" in error_line(proc)


def test_missing_model_file(tmp_path):
    proc = start("--model", tmp_path / "none.gguf", "--port", free_port())
    assert proc.returncode == 1 and "does not exist" in error_line(proc)


def test_stop_without_server_is_harmless(tmp_path):
    proc = run_script("serve.py", "stop", "--pid-file", tmp_path / "pid")
    assert "no server running" in proc.stdout
