"""Fixtures shared by unit and end-to-end tests: the local tiny model and a real Mooncake Store on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvpool_connector.testing.mooncake_pool import MooncakePool, mooncake_pool
from kvpool_connector.testing.tiny_model import build_model

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
    from kvpool_connector.testing.engine import EngineSpec, run_engine
    from kvpool_connector.testing.workloads import standard_prompts

    return run_engine(EngineSpec(model=tiny_model, prompts=standard_prompts()), tmp_path_factory.mktemp("standard"))


@pytest.fixture(scope="module")
def baseline_outputs(request: pytest.FixtureRequest, tiny_model: str, tmp_path_factory) -> list[list[int]]:
    """A no-connector engine's greedy outputs for the requesting module's ``PROMPTS`` (one at a time, ``MAX_TOKENS``
    each): the oracle the module's answers are compared with, token for token."""
    from kvpool_connector.testing.engine import EngineSpec, run_engine

    module = request.module
    spec = EngineSpec(model=tiny_model, prompts=module.PROMPTS, max_tokens=module.MAX_TOKENS, sequential=True)
    return run_engine(spec, tmp_path_factory.mktemp("baseline")).outputs


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    """A fresh master + pool node per test module, so modules never see each other's objects."""
    with mooncake_pool(tmp_path_factory.mktemp("mooncake"), segment_size="512 MB") as running:
        yield running


@pytest.fixture
def mooncake_client(pool: MooncakePool):
    """A plain Mooncake client (no segment) for tests that inspect or tamper with the pool directly."""
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    assert store.setup("127.0.0.1", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "", pool.master_address) == 0
    yield store
    store.close()
