"""Fixtures shared by unit and end-to-end tests: the local tiny model and a real Mooncake Store on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvpool_testkit.mooncake_pool import PoolOnFreePorts, mooncake_pool, plain_client
from kvpool_testkit.tiny_model import build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kvpool")


@pytest.fixture(scope="session")
def models_dir(session_dir: Path) -> Path:
    """Where the tiny models are built: ``KVPOOL_MODELS_DIR`` when set (``scripts/test.sh`` shares one build across its
    vLLM legs, so every release runs the very same weights), else this session's directory."""
    return Path(os.environ.get("KVPOOL_MODELS_DIR") or session_dir)


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> str:
    return str(build_model(models_dir / "tiny-llama", preset="tiny", seed=0))


@pytest.fixture(scope="session")
def mla_model(models_dir: Path) -> str:
    """The tiny DeepSeek-V2 (MLA + MoE); vLLM's CPU MLA and MoE take it in bf16 only."""
    return str(build_model(models_dir / "tiny-mla", preset="tiny-mla"))


@pytest.fixture(scope="session")
def standard_baseline(tiny_model: str, tmp_path_factory):
    """A no-connector engine's run of ``standard_prompts()`` (12 greedy tokens each, one batch): the oracle of every
    module that serves those prompts, whatever its executor or prefix-cache setting (greedy tokens do not depend on
    them; the modules' own pool runs must equal it)."""
    from kvpool_testkit.engine import EngineSpec, run_engine
    from kvpool_testkit.workloads import standard_prompts

    return run_engine(EngineSpec(model=tiny_model, prompts=standard_prompts()), tmp_path_factory.mktemp("standard"))


@pytest.fixture(scope="module")
def baseline_outputs(request: pytest.FixtureRequest, tiny_model: str, tmp_path_factory) -> list[list[int]]:
    """A no-connector engine's greedy outputs for the requesting module's ``PROMPTS`` (one at a time, ``MAX_TOKENS``
    each): the oracle the module's answers are compared with, token for token."""
    from kvpool_testkit.engine import EngineSpec, run_engine

    module = request.module
    spec = EngineSpec(model=tiny_model, prompts=module.PROMPTS, max_tokens=module.MAX_TOKENS, sequential=True)
    return run_engine(spec, tmp_path_factory.mktemp("baseline")).outputs


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    """A fresh master + pool node per test module, so modules never see each other's objects."""
    with mooncake_pool(tmp_path_factory.mktemp("mooncake"), segment_size="512 MB") as running:
        yield running


@pytest.fixture(scope="module")
def patient_pool(tmp_path_factory: pytest.TempPathFactory):
    """A module's pool whose master keeps a silent node for 60 s (10 by default): a host stall (a busy 2-core host
    can stand still for 20 s and more, see ``kvpool_testkit.pd``), or a test stopping the node for seconds, must not
    drop it and the objects it holds."""
    with mooncake_pool(tmp_path_factory.mktemp("mooncake"), segment_size="512 MB", client_ttl_s=60) as running:
        yield running


@pytest.fixture
def mooncake_client(pool: PoolOnFreePorts):
    """A plain Mooncake client (no segment) for tests that inspect or tamper with the pool directly."""
    with plain_client(pool) as store:
        yield store


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory):
    """A real memcache meta service for the module (one per machine at a time: memcache holds a process lock)."""
    from kvpool_testkit.memcache_meta import memcache_meta_service

    with memcache_meta_service(tmp_path_factory.mktemp("mmc-meta")) as running:
        yield running


@pytest.fixture
def pymmc(meta, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The pymmc test double, pointed at the module's real meta service, in place of memcache's data path."""
    from doubles.npu_worker import load_pymmc_double

    from kvpool_connector.backends import memcache as memcache_backend

    yield load_pymmc_double(monkeypatch, meta.local_config, tmp_path / "store")
    assert memcache_backend._PROCESS_CLIENT.users == 0, "a test left a memcache client open"


@pytest.fixture
def device(pymmc):
    """The accelerator double, whose memory the pymmc double knows as device memory."""
    from doubles.device_double import RecordingDevice

    device = RecordingDevice()
    pymmc.attach_device(device)
    return device
