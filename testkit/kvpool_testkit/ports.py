"""TCP ports for the servers tests, the demo and benchmarks start (pool master and node, meta service, proxy, vLLM's
server, event publishers), reserved so that no two users on this machine are handed the same one.

Binding port 0 and closing the socket hands out a port from the kernel's ephemeral range and releases it at once:
until the server that was meant to take it binds, the kernel may give the same port to any outgoing connection, and
another test process may be handed it too. Instead, :func:`reserve_port` picks from a range below the ephemeral range
(the kernel never picks from it for outgoing connections), holds an exclusive lock file per port for the rest of the
process's life (other processes using this module skip it; the lock goes with the process, even one killed), never
hands a port out twice in one process, and checks that nothing is bound on the port at the time.
Each pytest-xdist worker starts its search in its own slice of the range, so workers seldom meet on a lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import threading
from pathlib import Path

RANGE = (20000, 30000)
"""Ports handed out: below Linux's default ephemeral range (32768-60999) and outside the ports Mooncake's transfer
engine picks for itself."""
_SLICE = 1000  # each xdist worker starts its search this far from the previous worker's start
_LOCKS = Path(tempfile.gettempdir()) / "kvpool-ports"

_lock = threading.Lock()
_held: dict[int, int] = {}  # port -> the descriptor of its lock file, open (and locked) until the process exits
_next: int | None = None


def _worker_start() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...; unset outside xdist
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    return RANGE[0] + (index * _SLICE) % (RANGE[1] - RANGE[0])


def _bindable(port: int) -> bool:
    """Nothing listens on or is bound to ``port`` on any local address now."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _claim(port: int) -> bool:
    _LOCKS.mkdir(parents=True, exist_ok=True)
    fd = os.open(_LOCKS / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # held by another live process
    if not _bindable(port):  # taken by something outside this scheme
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return False
    _held[port] = fd
    return True


def reserve_port() -> int:
    """A TCP port on this machine that nothing else holds, reserved for this process until it exits."""
    global _next
    with _lock:
        if _next is None:
            _next = _worker_start()
        size = RANGE[1] - RANGE[0]
        for _ in range(size):
            port = _next
            _next = RANGE[0] + (_next + 1 - RANGE[0]) % size
            if port not in _held and _claim(port):
                return port
    raise RuntimeError(f"no free TCP port left in {RANGE[0]}-{RANGE[1] - 1}")
