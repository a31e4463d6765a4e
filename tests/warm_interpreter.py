"""A Python that has already imported torch, and forks a child for each script a test runs (tests/helpers.py).

Most scripts start by importing torch: ~1.5 s of CPU, paid ~150 times a suite. A child forked from here is
still a new process to the script, with its own argv, environment, working directory, stdin (/dev/null),
stdout and stderr (files), and exit status; it only finds torch, numpy and safetensors imported (with
--transformers, Transformers and PEFT too). Nothing of this project or gguf is imported here, so the scripts'
own import choices still run as they would.

Protocol, one request at a time: a JSON line on stdin {script, args, env, cwd, stdout, stderr}; the answer is
{"pid": N} once forked, then {"returncode": N} (negative: killed by that signal, as subprocess reports it).
"""
import atexit
import json
import os
import runpy
import sys
import traceback
import warnings

import numpy  # noqa: F401  (imported for the children)
import safetensors.torch  # noqa: F401
import torch  # noqa: F401

if "--transformers" in sys.argv:  # for the scripts that always load models with them (tests/helpers.py says which)
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

# Python 3.12 warns at every fork here, as the imports have started thread pools (numpy's BLAS), idle at the fork.
# Forking after those imports is what PyTorch's DataLoader workers do; on the H200 (Python 3.12, CUDA) a child
# of either flavour ran a CUDA op.
warnings.filterwarnings("ignore", message=r"This process .* is multi-threaded", category=DeprecationWarning)


def run_script(request: dict, answer_fd: int) -> None:
    """In the forked child: become the script's process, run it as __main__, exit with its status."""
    os.close(answer_fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)  # the old one may hold buffered requests
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = os.path.dirname(request["script"])  # what `python script.py` puts first
    code = 0
    try:
        runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what the interpreter runs at a normal exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


def main() -> None:
    answer_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing but answers goes to the test process
    os.close(devnull)
    for line in sys.stdin.buffer:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                run_script(request, answer_fd)
            finally:  # only when setting up the child failed
                traceback.print_exc()
                os._exit(1)
        os.write(answer_fd, (json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        os.write(answer_fd, (json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())


if __name__ == "__main__":
    main()
