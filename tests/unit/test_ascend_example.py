"""The Ascend example's scripts (examples/ascend) as shipped: env.sh's settings, the command line and environment the P
and D launch scripts hand vLLM (run for real up to their ``exec``, with a stand-in ``python3`` that records both, then
parsed by vLLM's own server argument parser), a failed step stopping a script with a message, and requests.sh
building its requests with bash alone and refusing a failed answer."""

from __future__ import annotations

import http.server
import importlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvpool_connector.config import parse_config
from kvpool_testkit.ports import reserve_port
from kvpool_testkit.workloads import SEED_REQUESTS

EXAMPLES = Path(__file__).parents[2] / "examples" / "ascend"
LAUNCHES = [("multi_producer.sh", "kv_transfer_producer.json"), ("multi_consumer.sh", "kv_transfer_consumer.json")]
VENDOR_ENV = """\
# like CANN's and memfabric's set_env.sh: reads a variable that may be unset, ends on a false test
export LD_LIBRARY_PATH=/opt/vendor/lib:$LD_LIBRARY_PATH
[ -d /nonexistent/vendor ] && export VENDOR_EXTRA=1
"""
RECORDER = """\
#!/usr/bin/env bash
# Stands in for the interpreter a script execs: records its arguments and environment (NUL-separated).
printf '%s\\0' "$@" > "$RECORD_DIR/argv"
env -0 > "$RECORD_DIR/env"
"""


def _split(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def _shell_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A caller's environment: python3 is the recorder, the vendor's set_env.sh is a stand-in, LD_LIBRARY_PATH is
    unset and PYTHONHASHSEED is random (env.sh must replace it)."""
    bin_dir, vendor, model = tmp_path / "bin", tmp_path / "mxc", tmp_path / "DeepSeek-V2-Lite-Chat"
    for d in (bin_dir, vendor, model, tmp_path / "record"):
        d.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(RECORDER)
    (bin_dir / "python3").chmod(0o755)
    (vendor / "set_env.sh").write_text(VENDOR_ENV)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "HERE") and not k.startswith("MMC_")}
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHONHASHSEED="random",
        MMC_INSTALL=str(vendor),
        MODEL_PATH=str(model),
        RECORD_DIR=str(tmp_path / "record"),
    )
    env.update(overrides)
    return env


def _server_args(argv: list[str]):
    """``argv`` parsed by vLLM's own parser of ``python -m vllm.entrypoints.openai.api_server`` (its module moved
    between releases); None where this vLLM cannot build it: a release without a CPU build (0.33, 0.34) finds no
    platform here, and the parser's defaults ask the platform."""
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if current_platform.is_unspecified():
        return None
    for module in ("openai.cli_args", "launchers.cli_args", "common.cli_args"):
        try:
            make_arg_parser = importlib.import_module(f"vllm.entrypoints.{module}").make_arg_parser
        except (ImportError, AttributeError):
            continue
        return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    raise AssertionError("no make_arg_parser in this vLLM")


def test_env_sh_sets_one_fixed_hash_seed_and_the_memcache_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HERE" and not k.startswith("MMC_")}
    env["PYTHONHASHSEED"] = "random"  # a caller's value does not survive: every node must hash alike
    out = subprocess.run(
        ["bash", "-c", f'source "{EXAMPLES}/env.sh"; env -0'], env=env, capture_output=True, check=True
    ).stdout
    sourced = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
    assert sourced["PYTHONHASHSEED"] == "0"
    assert Path(sourced["MMC_LOCAL_CONFIG_PATH"]) == EXAMPLES / "mmc-local.conf"
    settings = parse_config({"use_layerwise": False, "memcache_rpc_port": "0"}, env=sourced).backend_settings
    assert settings is not None and settings.meta_service_url == "tcp://127.0.0.1:5000"


@pytest.mark.vllm_api
@pytest.mark.parametrize(("script", "config"), LAUNCHES)
def test_a_launch_script_hands_vllm_the_shipped_config_and_hash_seed(script, config, tmp_path):
    from vllm.config import KVTransferConfig

    env = _shell_env(tmp_path)
    done = subprocess.run(["bash", str(EXAMPLES / script)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    argv = _split(tmp_path / "record" / "argv")
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    given = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert given == json.loads((EXAMPLES / config).read_text())
    transfer = KVTransferConfig(**given)
    assert transfer.kv_connector == "MultiConnector"
    assert transfer.kv_load_failure_policy == "recompute"
    args = _server_args(argv[2:])
    if args is not None:  # the whole command line, as vLLM's server reads it
        parsed = args.kv_transfer_config
        assert isinstance(parsed, KVTransferConfig) and parsed.kv_load_failure_policy == "recompute"
        assert parsed.kv_connector_extra_config == given["kv_connector_extra_config"]
        assert (args.model, args.block_size, args.tensor_parallel_size) == (env["MODEL_PATH"], 128, 2)
        assert args.enable_prefix_caching is (False if script == "multi_consumer.sh" else None)

    server_env = dict(item.split("=", 1) for item in _split(tmp_path / "record" / "env"))
    assert server_env["PYTHONHASHSEED"] == "0"
    assert server_env["LD_LIBRARY_PATH"].split(":")[:2] == [
        f"{server_env['ASCEND_TOOLKIT']}/python/site-packages",
        "/opt/vendor/lib",
    ]
    (ours,) = [
        c for c in transfer.kv_connector_extra_config["connectors"] if c["kv_connector"] == "MemcacheConnectorStoreV1"
    ]
    parsed = parse_config(ours["kv_connector_extra_config"], env=server_env)  # what our child reads at start-up
    assert parsed.pool.backend == "memcache"
    assert Path(server_env["MMC_LOCAL_CONFIG_PATH"]) == EXAMPLES / "mmc-local.conf"
    assert parsed.backend_settings.meta_service_url == "tcp://127.0.0.1:5000"


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"MMC_INSTALL": "/nonexistent/mxc"}, "vendor environment script not found: /nonexistent/mxc/set_env.sh"),
        ({"MODEL_PATH": "/nonexistent/model"}, "model not found: MODEL_PATH=/nonexistent/model"),
        ({"MMC_LOCAL_CONFIG_PATH": "/nonexistent/mmc-local.conf"}, "memcache local-service config"),
    ],
)
@pytest.mark.parametrize("script", [s for s, _ in LAUNCHES])
def test_a_launch_script_stops_with_a_message_at_a_failed_step(script, broken, message, tmp_path):
    env = _shell_env(tmp_path, **broken)
    done = subprocess.run(["bash", str(EXAMPLES / script)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert f"{script}: {message}" in done.stderr
    assert not (tmp_path / "record" / "argv").exists()  # vLLM never started


def test_a_launch_script_stops_when_its_json_cannot_be_read(tmp_path):
    here = tmp_path / "example"
    here.mkdir()
    for name in ("env.sh", "multi_producer.sh", "mmc-local.conf", "mooncake.json"):
        (here / name).write_bytes((EXAMPLES / name).read_bytes())
    env = _shell_env(tmp_path)
    done = subprocess.run(
        ["bash", str(here / "multi_producer.sh")], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "kv_transfer_producer.json" in done.stderr and "failed" in done.stderr
    assert not (tmp_path / "record" / "argv").exists()


def _requests_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No Python on the path: a python3 or python call would leave a mark."""
    bin_dir = tmp_path / "no-python"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python3", "python"):
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\ntouch "{tmp_path}/python-called"; exit 97\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("HERE", "REQUESTS_URL")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", MODEL_PATH="/mnt/weight/model", **extra)
    return env


def test_requests_sh_builds_the_seed_requests_with_bash_alone(tmp_path):
    done = subprocess.run(
        ["bash", str(EXAMPLES / "requests.sh"), "--dry-run"],
        env=_requests_env(tmp_path),
        capture_output=True,
        check=True,
    )
    bodies = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [(b["prompt"], b["max_tokens"]) for b in bodies] == SEED_REQUESTS
    assert all(b["model"] == "/mnt/weight/model" and b["temperature"] == 0.0 for b in bodies)
    assert not (tmp_path / "python-called").exists()


@pytest.fixture
def answering() -> Iterator[tuple[str, list]]:
    """A stand-in server at a URL: each POST gets the next (status, body) of the list the test fills in."""
    replies: list[tuple[int, dict]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = replies.pop(0)
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", replies
    finally:
        server.shutdown()
        thread.join()


def _answer(finish_reason: str) -> dict:
    return {"choices": [{"index": 0, "text": " x", "finish_reason": finish_reason}]}


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ((200, _answer("length")), None),
        ((500, {"error": {"message": "KV load failed"}}), "long request failed (HTTP 500)"),
        ((200, _answer("error")), "long request failed (HTTP 200)"),
    ],
)
def test_requests_sh_stops_at_a_failed_answer(answering, second, message, tmp_path):
    url, replies = answering
    replies += [(200, _answer("length")), second]
    env = _requests_env(tmp_path, REQUESTS_URL=url)
    done = subprocess.run(["bash", str(EXAMPLES / "requests.sh")], env=env, capture_output=True, text=True, check=False)
    if message is None:
        assert done.returncode == 0, done.stderr
        assert [json.loads(line) for line in done.stdout.splitlines()] == [_answer("length")] * 2
    else:
        assert done.returncode != 0
        assert f"requests.sh: {message}" in done.stderr
    assert not (tmp_path / "python-called").exists()


def test_requests_sh_stops_when_nothing_answers(tmp_path):
    env = _requests_env(tmp_path, PROXY_PORT=str(reserve_port()))
    done = subprocess.run(["bash", str(EXAMPLES / "requests.sh")], env=env, capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "requests.sh: short request: no answer from http://127.0.0.1:" in done.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.sh")))
def test_every_script_is_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(EXAMPLES / script)], check=False).returncode == 0
