"""The test kit's port reservation: no port is handed out twice on this machine while its holder lives, none from the
kernel's ephemeral range, none that something else has bound."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from kvpool_testkit import ports
from kvpool_testkit.ports import reserve_port

_RESERVE_IN_CHILD = (
    "import json; from kvpool_testkit.ports import reserve_port as r; print(json.dumps([r() for _ in range(20)]))"
)


def test_ports_lie_below_the_kernels_ephemeral_range_and_are_never_handed_out_twice():
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    mine = [reserve_port() for _ in range(20)]
    assert len(set(mine)) == 20
    assert all(ports.RANGE[0] <= port < min(ports.RANGE[1], ephemeral_low) for port in mine)


def test_other_processes_skip_the_ports_this_one_holds_and_each_others():
    mine = {reserve_port() for _ in range(20)}
    children = [subprocess.Popen([sys.executable, "-c", _RESERVE_IN_CHILD], stdout=subprocess.PIPE) for _ in range(2)]
    first, second = (set(json.loads(child.communicate(timeout=60)[0])) for child in children)
    assert len(first) == len(second) == 20
    assert not mine & first and not mine & second and not first & second


def test_a_port_bound_outside_the_scheme_is_skipped():
    port = reserve_port() + 1  # the next one this process would try
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        assert reserve_port() != port
