"""Several network hosts on one machine: Linux network namespaces joined by veth pairs on a bridge.

Each host is a namespace with one interface (``eth0``) and an address on a private test subnet; the bridge lives in a
namespace of its own, so nothing here touches the machine's own network. A partition is a host's bridge port taken
down (its peer then has no carrier: what a pulled cable or a dead switch port looks like); healing brings it up.

Code runs "on" a host by entering its namespace on the calling thread (:meth:`Topology.on`): sockets opened and
processes started there belong to that host, and keep belonging to it after the thread leaves. Needs root.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass
class Topology:
    """Hosts named ``names`` on ``subnet``.0/24 (addresses .1, .2, ... in order), created by :func:`topology`."""

    names: tuple[str, ...]
    subnet: str = "10.213.0"
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])  # keeps parallel topologies apart
    created: list[str] = field(default_factory=list)  # namespaces made so far: what teardown removes

    def namespace(self, host: str) -> str:
        return f"kvp-{self.tag}-{host}"

    @property
    def bridge_namespace(self) -> str:
        return self.namespace("bridge")

    def address(self, host: str) -> str:
        return f"{self.subnet}.{self.names.index(host) + 1}"

    def _port(self, host: str) -> str:
        return f"p{self.names.index(host)}-{self.tag}"  # the bridge side of the host's veth (<= 15 characters)

    def create(self) -> None:
        bridge = self.bridge_namespace
        _ip("netns", "add", bridge)
        self.created.append(bridge)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        _ip("-n", bridge, "link", "set", "lo", "up")
        for host in self.names:
            ns, port = self.namespace(host), self._port(host)
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", bridge)
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", bridge, "link", "set", port, "master", "br0")
            _ip("-n", bridge, "link", "set", port, "up")

    def remove(self) -> None:
        """Delete every namespace made (their veths go with them); processes still inside keep running detached."""
        while self.created:
            subprocess.run(["ip", "netns", "del", self.created.pop()], capture_output=True, check=False)

    def partition(self, host: str) -> None:
        """Cut ``host`` off from every other host (its bridge port down)."""
        _ip("-n", self.bridge_namespace, "link", "set", self._port(host), "down")

    def heal(self, host: str) -> None:
        _ip("-n", self.bridge_namespace, "link", "set", self._port(host), "up")

    @contextmanager
    def on(self, host: str) -> Iterator[str]:
        """Run the block on ``host``: the calling thread enters its namespace and returns to its own afterwards.
        Yields the host's address."""
        with open("/proc/thread-self/ns/net") as own, open(f"/run/netns/{self.namespace(host)}") as target:
            _setns(target.fileno())
            try:
                yield self.address(host)
            finally:
                _setns(own.fileno())


@contextmanager
def topology(*names: str, subnet: str = "10.213.0") -> Iterator[Topology]:
    """Create hosts ``names`` on a bridge; remove them on exit, however the block ends."""
    topo = Topology(tuple(names), subnet)
    try:
        topo.create()
        yield topo
    finally:
        topo.remove()


def available() -> bool:
    """Whether this process may create network namespaces (root with ``ip``)."""
    return os.geteuid() == 0 and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0
