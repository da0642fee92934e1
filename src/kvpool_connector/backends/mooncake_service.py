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

``--disk-dir DIR --disk-size SIZE`` puts a disk tier under the node's DRAM through Mooncake's own offload
(:class:`DiskTier`): an object the master evicts from DRAM is written to a file bucket first and read from it later;
engines need nothing new but the local buffer the printed config gives them.

Needs only the ``mooncake`` package and the standard library: a pool host runs no vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvpool_connector.config import ConfigError, parse_size
from kvpool_connector.processes import spawn, stop_process, wait_port

LEASE_MS = 5000
"""How long an object a lookup found stays un-evictable (the master's ``--default_kv_lease_ttl``)."""
DISK_TIER_LEASE_MS = 1000
"""With a disk tier: eviction (and so offload) skips leased objects, and the node's own read of an object it is
writing to disk leases it too, so the lease paces the offload (about 0.9 x segment / (1 s heartbeat + lease)
measured: 12.6 MB/s at 5 s, 34 at 1 s, on a 64 MB segment with 2 MB objects)."""
MIN_BUCKET_BYTES = 16 << 20
DISK_CLIENT_BUFFER = "64MB"
"""A TCP client reads a disk-only object through its local buffer (with none, the read returns nothing)."""


@dataclass(frozen=True)
class DiskTier:
    """A pool node's disk tier through Mooncake's offload, with the settings that kept every object.

    Measured with a 64 MB segment and 256 objects of 1-3 MB (every one back byte-exact, TCP and shared-memory readers):
    the master offloads an object when it evicts it (``--offload_on_evict``: without it 40 of 256 were lost), into
    file buckets of ``bucket_bytes`` written at a 1-s heartbeat. A bucket must hold whole objects and fill well before
    the segment does: at 3/4 of the segment offload ran 2.4x slower, at the whole segment the pool took no more puts.
    Past ``size_bytes`` the oldest buckets are dropped (fifo). A node restarted on the same directory gets its objects
    back once the master has dropped the old node (``--client-ttl``), not sooner."""

    directory: Path
    size_bytes: int
    bucket_bytes: int

    @classmethod
    def plan(cls, directory: Path, size: str, segment: str, bucket: str | None = None) -> DiskTier:
        """The tier for a node of ``segment`` DRAM; a ConfigError names each setting known to lose or stall."""
        segment_bytes = parse_size(segment, "--segment-size")
        size_bytes = parse_size(size, "--disk-size")
        bucket_bytes = (
            parse_size(bucket, "--disk-bucket-size")
            if bucket
            else min(max(segment_bytes // 4, MIN_BUCKET_BYTES), segment_bytes // 2)
        )
        if segment_bytes < 4 * MIN_BUCKET_BYTES:
            raise ConfigError(
                f"--segment-size {segment}: a disk tier needs at least 64 MB of DRAM, room for a 16 MB bucket being "
                "written beside the objects it takes"
            )
        if not MIN_BUCKET_BYTES <= bucket_bytes <= segment_bytes // 2:
            raise ConfigError(
                f"--disk-bucket-size {bucket}: must be between 16 MB and half the segment ({segment_bytes // 2 >> 20} "
                "MB): a bucket smaller than an object never fills (every put refused), one near the segment's size "
                "never leaves room to write it"
            )
        if size_bytes < 4 * bucket_bytes:
            raise ConfigError(
                f"--disk-size {size}: at least 4 buckets ({4 * bucket_bytes >> 20} MB), or the oldest buckets are "
                "dropped as fast as new ones are written"
            )
        directory = directory.expanduser().resolve()  # Mooncake refuses relative paths, links and '..'
        directory.mkdir(parents=True, exist_ok=True)
        if size_bytes > (free := shutil.disk_usage(directory).free):
            raise ConfigError(f"--disk-size {size}: more than the {free >> 20} MB free under {directory}")
        return cls(directory, size_bytes, bucket_bytes)

    def node_env(self) -> dict[str, str]:
        """The pool node's environment: Mooncake reads its offload settings from it."""
        size = str(self.size_bytes)
        return {
            "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH": str(self.directory),
            "MOONCAKE_OFFLOAD_STORAGE_BACKEND_DESCRIPTOR": "bucket_storage_backend",  # its buckets survive a restart
            "MOONCAKE_OFFLOAD_HEARTBEAT_INTERVAL_SECONDS": "1",  # the offload pace divides by it; 1 is its least
            "MOONCAKE_OFFLOAD_BUCKET_SIZE_LIMIT_BYTES": str(self.bucket_bytes),
            "MOONCAKE_OFFLOAD_BUCKET_KEYS_LIMIT": "1024",  # the size closes a bucket, not the count
            "MOONCAKE_OFFLOAD_BUCKET_MAX_TOTAL_SIZE": size,
            "MOONCAKE_OFFLOAD_BUCKET_MAX_PHYSICAL_BYTES": size,
            "MOONCAKE_OFFLOAD_BUCKET_EVICTION_POLICY": "fifo",
            "MOONCAKE_OFFLOAD_TOTAL_SIZE_LIMIT_BYTES": size,  # the master's file capacity metric (else 2 TB)
            "MOONCAKE_OFFLOAD_LOCAL_BUFFER_SIZE_BYTES": str(max(64 << 20, 4 * self.bucket_bytes)),
        }


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
    disk: DiskTier | None = None
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
            "local_buffer_size": DISK_CLIENT_BUFFER if self.disk else 0,
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
            f"--default_kv_lease_ttl={DISK_TIER_LEASE_MS if self.disk else LEASE_MS}",
            f"--client_ttl={self.client_ttl_s}",
            "--logtostderr=true",
            *(("--enable_offload=true", "--offload_on_evict=true") if self.disk else ()),
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
            *(("--enable_offload=true",) if self.disk else ()),
            env={**os.environ, **self.disk.node_env()} if self.disk else None,
        )

    def _start(
        self, binary: str, host: str, port: int, *flags: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """One of the two binaries, its output in ``<binary>.log``, returned once it listens on ``host:port``."""
        log = self.workdir / f"{binary}.log"
        proc = spawn([str(mooncake_bin(binary)), *flags], log, env=env)
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
            "disk_used_bytes": samples.get("master_allocated_file_size_bytes", 0.0),
            "disk_capacity_bytes": samples.get("master_total_file_capacity_bytes", 0.0),
            # Reads the master served from each tier (its counters end in "_", hence the double underscore).
            "dram_hits": samples.get("mem_cache_hit_nums__total", 0.0),
            "disk_hits": samples.get("file_cache_hit_nums__total", 0.0),
        }

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
    disk = (
        f", disk {h['disk_used_bytes'] / 2**20:.0f} of {h['disk_capacity_bytes'] / 2**20:.0f} MiB used, "
        f"reads served {h['dram_hits']:.0f} from DRAM, {h['disk_hits']:.0f} from disk"
        if pool.disk
        else ""
    )
    return (
        f"health: {h['objects']:.0f} objects, {h['used_bytes'] / 2**20:.0f} of {h['capacity_bytes'] / 2**20:.0f} MiB "
        f"used{disk}, {h['clients']:.0f} clients, segments {' '.join(h['segments'])}"
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
    parser.add_argument(
        "--disk-dir", type=Path, help="a disk tier under the DRAM: objects evicted from DRAM go to files here"
    )
    parser.add_argument("--disk-size", default="", help="with --disk-dir: the most the tier holds (e.g. 500GB)")
    parser.add_argument(
        "--disk-bucket-size", help="with --disk-dir: the size of its files (default: a quarter of the segment)"
    )
    parser.add_argument("--workdir", type=Path, default=Path(".kvpool"), help="where the two logs go")
    parser.add_argument("--config-out", type=Path, help="also write the settings as a MOONCAKE_CONFIG_PATH file")
    parser.add_argument("--health-interval", type=float, default=30.0, help="seconds between health lines (0: none)")
    args = parser.parse_args(argv)
    listen, advertise, node_host = _addresses(parser, args)
    disk = None
    if args.disk_dir or args.disk_size:
        if not (args.disk_dir and args.disk_size):
            parser.error("a disk tier needs both --disk-dir and --disk-size")
        try:
            disk = DiskTier.plan(args.disk_dir, args.disk_size, args.segment_size, args.disk_bucket_size)
        except ConfigError as exc:
            parser.error(str(exc))
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
        disk=disk,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with running(pool):
            extra = {"backend": "mooncake", "mooncake": pool.client_config()}
            bound = "" if listen == advertise else f" (bound to {listen})"
            tier = (
                f", disk tier {disk.directory} ({args.disk_size}, {disk.bucket_bytes >> 20} MB buckets)" if disk else ""
            )
            print(f"KV pool up: mooncake_master {pool.master_address}{bound}, pool node {pool.node_host}:"
                  f"{pool.node_port} ({args.segment_size}{tier}); logs in {pool.workdir}")  # fmt: skip
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
