"""A standalone KV pool in one command: a Mooncake ``mooncake_master`` and one ``mooncake_client`` pool node.

Why a standalone pool: with Mooncake's defaults every vLLM worker adds a segment of its own memory to the pool
(``global_segment_size``), so the KV it caches lives in the vLLM process and is gone when that process exits; a
restarted or second engine then finds only what other live engines hold. A pool node is a process of its own: what
it holds outlives every engine. Engines then contribute no memory (``global_segment_size: 0``) and reach the node over
TCP, or through shared memory from the same host (``real_client_address``).

``kvpool-pool`` (or ``python -m kvpool_connector.backends.mooncake_service``) starts both binaries (they ship in the
``mooncake`` Python package), prints the ``kv_connector_extra_config`` engines should use (and writes it as a
``MOONCAKE_CONFIG_PATH`` file with ``--config-out``), reports the pool's health every ``--health-interval`` seconds
(objects, bytes used, live clients, segments), and stops both on Ctrl-C or SIGTERM. Across hosts, ``--listen`` is
where the master binds and ``--advertise`` the address engines are given (``--host`` sets both).

Needs only the ``mooncake`` package and the standard library: a pool host runs no vLLM.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvpool_connector.processes import spawn, stop_process, wait_port


def mooncake_bin(name: str) -> Path:
    import mooncake

    path = Path(mooncake.__file__).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the mooncake package at {path.parent}")
    return path


def connector_config(mooncake: dict, role: str = "kv_both", **extra: object) -> dict:
    """A ``--kv-transfer-config`` naming MemcacheConnectorStoreV1 with inline Mooncake settings."""
    return {
        "kv_connector": "MemcacheConnectorStoreV1",
        "kv_role": role,
        "kv_connector_extra_config": {"backend": "mooncake", "mooncake": mooncake, **extra},
    }


@dataclass
class MooncakePool:
    """A master and one pool node holding ``segment_size`` of DRAM; ``client_config`` is what engines need."""

    workdir: Path
    segment_size: str = "4 GB"
    client_ttl_s: int = 10  # the master's --client_ttl: a node silent that long is dropped with its objects
    master_port: int = 50051
    metrics_port: int = 9003
    node_port: int = 50052
    host: str = "127.0.0.1"  # the address engines (and the node) reach the master at
    listen: str = ""  # the address the master binds (default: ``host``; 0.0.0.0 binds every interface)
    node_host: str = ""  # the pool node's address (default: ``host``; another host's in a multi-host deployment)
    master: subprocess.Popen | None = None
    node: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.listen = self.listen or self.host
        self.node_host = self.node_host or self.host

    @property
    def _master_local(self) -> str:
        """Where this host reaches the master: its bind address, or the advertised one when it binds every
        interface."""
        return self.host if self.listen in WILDCARD_ADDRESSES else self.listen

    @property
    def master_address(self) -> str:
        return f"{self.host}:{self.master_port}"

    def client_config(
        self, global_segment_size: int | str = 0, shared_memory: bool = False, local_hostname: str | None = None
    ) -> dict:
        """Inline ``"mooncake"`` settings: by default engines contribute no memory, objects live on the pool node.

        ``shared_memory`` attaches workers to the pool node through shared memory (engines on the node's host);
        ``local_hostname``: the engine host's own address (default: the pool's, right when they share a host).
        """
        config: dict[str, object] = {
            "master_server_address": self.master_address,
            "local_hostname": local_hostname or self.host,
            "metadata_server": "P2PHANDSHAKE",
            "protocol": "tcp",
            "global_segment_size": global_segment_size,
            "local_buffer_size": 0,
        }
        if shared_memory:
            config["real_client_address"] = f"{self.node_host}:{self.node_port}"
        return config

    def connector_config(
        self, role: str = "kv_both", global_segment_size: int | str = 0, shared_memory: bool = False, **extra: object
    ) -> dict:
        """A ``--kv-transfer-config`` naming MemcacheConnectorStoreV1 on this pool; ``extra`` goes to its keys."""
        return connector_config(self.client_config(global_segment_size, shared_memory), role, **extra)

    def write_config_file(self, path: Path) -> Path:
        """The settings as a ``MOONCAKE_CONFIG_PATH`` JSON file (``mooncake.json``, as vllm-ascend deployments use)."""
        path.write_text(json.dumps(self.client_config(), indent=2))
        return path

    def start_master(self) -> None:
        self.master = self._start(
            "mooncake_master",
            self._master_local,
            self.master_port,
            f"--rpc_address={self.listen}",
            f"--rpc_port={self.master_port}",
            f"--metrics_host={self.listen}",
            f"--metrics_port={self.metrics_port}",
            "--enable_http_metadata_server=false",
            "--default_kv_lease_ttl=5000",
            f"--client_ttl={self.client_ttl_s}",
            "--logtostderr=true",
        )

    def start_node(self) -> None:
        self.node = self._start(
            "mooncake_client",
            self.node_host,
            self.node_port,
            f"--host={self.node_host}",
            f"--port={self.node_port}",
            f"--master_server_address={self.master_address}",
            "--metadata_server=P2PHANDSHAKE",
            f"--global_segment_size={self.segment_size}",
            "--local_buffer_size=16 MB",
            "--protocol=tcp",
        )

    def _start(self, binary: str, host: str, port: int, *flags: str) -> subprocess.Popen:
        """One of the two binaries, its output in ``<binary>.log``, returned once it listens on ``host:port``."""
        log = self.workdir / f"{binary}.log"
        proc = spawn([str(mooncake_bin(binary)), *flags], log)
        wait_port(port, proc, 30, binary, log, host=host)
        return proc

    def _master_http(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self._master_local}:{self.metrics_port}{path}", timeout=5) as answer:
            return answer.read().decode()

    def segments(self) -> list[str]:
        """Segments the master places objects on. A killed node's stays listed until its heartbeat TTL runs out
        (``--client_ttl``): meanwhile puts placed on it fail with -800."""
        return self._master_http("/get_all_segments").split()

    def master_metrics(self) -> dict[str, float]:
        """The master's Prometheus samples (``master_key_count``, ``master_put_start_alloc_failures_total``, ...)."""
        return parse_samples(self._master_http("/metrics"))

    def health(self) -> dict[str, float | list[str]]:
        """What the master reports: objects, bytes used of the capacity, live clients, segments."""
        samples = self.master_metrics()
        return {
            "objects": samples.get("master_key_count", 0.0),
            "used_bytes": samples.get("master_allocated_bytes", 0.0),
            "capacity_bytes": samples.get("master_total_capacity_bytes", 0.0),
            "clients": samples.get("master_active_clients", 0.0),
            "segments": self.segments(),
        }

    def stop_master(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.master, sig)

    def stop(self) -> None:
        """Node first, then master; each gets ``STOP_GRACE_S`` after SIGTERM before SIGKILL: a pool's objects die with
        it either way, and a node busy with transfers may take long to stop by itself."""
        stop_process(self.node, timeout_s=STOP_GRACE_S)
        stop_process(self.master, timeout_s=STOP_GRACE_S)


STOP_GRACE_S = 10.0
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text samples by name, labels dropped (the last of a name wins), counters named ``*_total`` as
    prometheus_client names them. Parsed here because a pool host need not have prometheus_client: the master's
    exposition is plain ``name{labels} value`` lines."""
    counters: set[str] = set()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = [*line.split(), "", ""][:4]
            if kind == "counter":
                counters.add(name)
            continue
        if not line or line.startswith("#"):
            continue
        name, brace, rest = line.partition("{")
        if brace:
            rest = rest.rpartition("}")[2]
        else:
            name, _, rest = line.partition(" ")
        name, fields = name.strip(), rest.split()
        if name in counters and not name.endswith("_total"):
            name += "_total"
        try:
            samples[name] = float(fields[0])
        except (IndexError, ValueError):
            continue
    return samples


@contextmanager
def running(pool: MooncakePool) -> Iterator[MooncakePool]:
    """Start the master and the node; stop both (node first) on exit, however it comes."""
    pool.workdir.mkdir(parents=True, exist_ok=True)
    try:
        pool.start_master()
        pool.start_node()
        yield pool
    finally:
        pool.stop()


def _addresses(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str, str]:
    """(listen, advertise, node host): ``--host`` is the default of the first two, ``--advertise`` of the third."""
    listen = args.listen or args.host
    advertise = args.advertise or args.host
    if advertise in WILDCARD_ADDRESSES:
        parser.error(
            f"engines cannot reach {advertise or 'an empty address'}: give --advertise ADDRESS, the address other "
            f"hosts reach this one at (with --listen {listen or '0.0.0.0'} to bind every interface)"
        )
    return listen, advertise, args.node_host or advertise


def _health_line(pool: MooncakePool) -> str:
    h = pool.health()
    return (
        f"health: {h['objects']:.0f} objects, {h['used_bytes'] / 2**20:.0f} of {h['capacity_bytes'] / 2**20:.0f} MiB "
        f"used, {h['clients']:.0f} clients, segments {' '.join(h['segments'])}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvpool-pool", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="the default of --listen and --advertise")
    parser.add_argument("--listen", help="address the master and its metrics bind (0.0.0.0: every interface)")
    parser.add_argument("--advertise", help="address engines and the node reach the master at (default: --host)")
    parser.add_argument(
        "--node-host",
        help="the pool node's address: where engines transfer KV and where its real_client_address port binds "
        "(default: --advertise)",
    )
    parser.add_argument("--master-port", type=int, default=50051)
    parser.add_argument("--node-port", type=int, default=50052, help="the node's port (real_client_address)")
    parser.add_argument("--metrics-port", type=int, default=9003, help="the master's HTTP metrics port")
    parser.add_argument("--segment-size", default="4GB", help="DRAM the pool node holds KV in")
    parser.add_argument(
        "--client-ttl",
        type=int,
        default=10,
        help="seconds the master keeps a silent client; a node silent longer (a partition) is dropped with every "
        "object it holds (Mooncake's default: 10)",
    )
    parser.add_argument("--workdir", type=Path, default=Path(".kvpool"), help="where the two logs go")
    parser.add_argument("--config-out", type=Path, help="also write the settings as a MOONCAKE_CONFIG_PATH file")
    parser.add_argument("--health-interval", type=float, default=30.0, help="seconds between health lines (0: none)")
    args = parser.parse_args(argv)
    listen, advertise, node_host = _addresses(parser, args)
    pool = MooncakePool(
        args.workdir.resolve(),
        segment_size=args.segment_size,
        client_ttl_s=args.client_ttl,
        master_port=args.master_port,
        metrics_port=args.metrics_port,
        node_port=args.node_port,
        host=advertise,
        listen=listen,
        node_host=node_host,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with running(pool):
            extra = {"backend": "mooncake", "mooncake": pool.client_config()}
            bound = "" if listen == advertise else f" (bound to {listen})"
            print(f"KV pool up: mooncake_master {pool.master_address}{bound}, pool node {pool.node_host}:"
                  f"{pool.node_port} ({args.segment_size}); logs in {pool.workdir}")  # fmt: skip
            shm = f'"real_client_address": "{pool.node_host}:{pool.node_port}"'
            print(
                f"kv_connector_extra_config for engines (set local_hostname to each engine host's own address; on "
                f"this host, add {shm} to mooncake for shared memory):"
            )
            if args.config_out:
                pool.write_config_file(args.config_out)
            print(json.dumps(extra))
            if args.config_out:
                print(f'or MOONCAKE_CONFIG_PATH={args.config_out} with {{"backend": "mooncake"}}')
            sys.stdout.flush()
            while not stop.wait(args.health_interval or None):
                if pool.master.poll() is not None or pool.node.poll() is not None:
                    print("mooncake_master or the pool node exited; see the logs", file=sys.stderr)
                    raise SystemExit(1)
                # The health line only reports: whatever breaks it must not stop the pool (and lose its objects).
                try:
                    print(_health_line(pool), flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"health: not available ({exc!r}); the pool keeps serving", file=sys.stderr, flush=True)
    except ImportError as exc:
        print(f"kvpool-pool needs Mooncake ({exc}): pip install 'kvpool-connector[mooncake]'", file=sys.stderr)
        raise SystemExit(1) from None
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"kvpool-pool: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print("KV pool stopped")


if __name__ == "__main__":
    main()
