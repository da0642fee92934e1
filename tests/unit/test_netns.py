"""The multi-host test topology itself: hosts reach each other only over the bridge, a partition cuts one host off,
and every namespace is gone afterwards, also when the block fails."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from kvpool_testkit import netns

pytestmark = [
    pytest.mark.skipif(not netns.available(), reason="network namespaces need root and iproute2"),
    pytest.mark.processes,
]


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def reaches(topo: netns.Topology, src: str, dst: str, port: int, within_s: float = 0.5) -> bool:
    """Whether ``src`` connects to ``dst``:``port`` within ``within_s`` (a link just brought up takes a moment)."""
    deadline = time.monotonic() + within_s
    while True:
        with topo.on(src), socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((topo.address(dst), port)) == 0:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def test_hosts_talk_over_the_bridge_and_a_partition_cuts_one_off() -> None:
    with netns.topology("a", "b", "c") as topo:
        with topo.on("b") as address:  # a socket made here belongs to b's namespace
            server = socket.create_server((address, 0))
        port = server.getsockname()[1]
        assert reaches(topo, "a", "b", port, within_s=10) and reaches(topo, "c", "b", port, within_s=10)
        with socket.socket() as outside:  # the machine's own namespace has no route into the test subnet
            outside.settimeout(0.5)
            assert outside.connect_ex((topo.address("b"), port)) != 0
        topo.partition("b")
        assert not reaches(topo, "a", "b", port)
        topo.heal("b")
        assert reaches(topo, "a", "b", port, within_s=10)
        server.close()
        tag = topo.tag
    assert tag not in namespaces()


def test_namespaces_are_removed_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError, match="inside"), netns.topology("a", "b") as topo:
        tag = topo.tag
        assert tag in namespaces()
        raise RuntimeError("inside")
    assert tag not in namespaces()
