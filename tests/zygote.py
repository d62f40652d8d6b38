"""The test servers' zygote: one process per test process that imports the service once (torch, timm,
torchvision, the app: 4 to 5 CPU-s) and then forks a `python -m service serve` for each server a test asks
for, so that a server start costs its settings and its model load, not the imports. About 25 servers start
in a `make test` run, on a CPU-bound 2-core machine.

A forked server runs `service.__main__.main(argv)` as `python -m service` would: `sys.argv`, `__main__`,
the environment, the working directory, stdin, stdout and stderr set as for a fresh process, and its
random generators reseeded. Its parent is the zygote, which sends the server's pid, and later its exit
status, over the connection the test asked on (tests/server.py reads them as a `subprocess.Popen` would).
The starts that are themselves under test (`--workers`' spawned workers, a failing start-up, the README's
commands, the CLI) stay fresh interpreters; `VIT_TEST_FRESH_SERVERS=1` makes every server one.

    python -m tests.zygote SOCKET   # serves until its stdin closes (its test process ended)
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys


class _Fork(Exception):
    """Raised in the child, out of the zygote's loop, to run the server with the loop's frames gone."""

    def __init__(self, request: dict) -> None:
        self.request = request


def _serve(request: dict) -> None:
    """The forked child: becomes `python -m service ARGV` and exits with its code (atexit handlers run)."""
    import random

    import numpy as np

    import service.__main__ as entry

    fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = [entry.__file__, *request["argv"]]
    sys.modules["__main__"] = entry  # multiprocessing's spawn (--workers) reads it, as under `python -m`
    random.seed()
    np.random.seed()
    sys.exit(entry.main(request["argv"]))


def _loop(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)  # the path appears only once connections are accepted
    children: dict[int, socket.socket] = {}  # pid -> the connection its status goes back on
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 0.1)
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            return  # the test process has gone: its servers were its to stop
        if listener in ready:
            conn, _ = listener.accept()
            with conn.makefile("rb") as f:
                request = json.loads(f.readline())
            pid = os.fork()
            if pid == 0:
                for s in (listener, conn, *children.values()):
                    s.close()
                raise _Fork(request)
            conn.sendall(f"{pid}\n".encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):  # the test may have stopped listening
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                conn.close()


def main(path: str) -> None:
    # the imports every server makes (torch, timm, torchvision, FastAPI, the app), made once, here
    import service.__main__
    import service.app
    import service.cli.serve
    import service.server
    import service.workers  # noqa: F401

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal ends the tests, then this
    try:
        _loop(path)
    except _Fork as fork:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _serve(fork.request)


if __name__ == "__main__":
    main(sys.argv[1])
