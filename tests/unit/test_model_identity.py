"""The model's part of a pool key follows its weights and config, not its path.

Checkpoints here are written as a user's would be (config.json, safetensors files via the safetensors package,
an index, a Hugging Face cache folder with blobs and snapshot links); the model config is vLLM's own ``ModelConfig``
where vLLM is needed, else a plain record of the fields the identity reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from kvpool_connector import model_identity as mi
from kvpool_connector.model_identity import model_identity


def write_checkpoint(folder: Path, seed: int = 0, rope_theta: float = 10000.0, name: str = "model") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((64, 64)).astype(np.float32)}, folder / f"{name}.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "rope_theta": rope_theta, "_name_or_path": str(folder)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def identity_of(folder: Path | str, **fields) -> str:
    mi._identity.cache_clear()
    return model_identity(SimpleNamespace(model=str(folder), **fields)).digest


def test_one_checkpoint_at_two_paths_is_one_model(tmp_path):
    first = write_checkpoint(tmp_path / "a")
    second = tmp_path / "mounted" / "elsewhere"
    shutil.copytree(first, second)
    (second / "config.json").write_text(
        json.dumps({**json.loads((first / "config.json").read_text()), "_name_or_path": "/other/path"})
    )
    assert identity_of(first) == identity_of(second)


def test_new_weights_of_the_same_size_under_one_path_are_another_model(tmp_path):
    folder = write_checkpoint(tmp_path / "m", seed=0)
    before = identity_of(folder)
    size = (folder / "model.safetensors").stat().st_size
    write_checkpoint(folder, seed=1)
    assert (folder / "model.safetensors").stat().st_size == size
    assert identity_of(folder) != before


def test_config_fields_that_change_the_kv_change_the_identity(tmp_path):
    base = identity_of(write_checkpoint(tmp_path / "a"))
    assert identity_of(write_checkpoint(tmp_path / "b", rope_theta=500000.0)) != base
    assert identity_of(tmp_path / "a", hf_overrides={"rope_theta": 500000.0}) != base
    assert identity_of(tmp_path / "a", quantization="fp8") != base
    assert identity_of(tmp_path / "a", hf_overrides={}) == base  # vLLM's empty default is no override


def test_model_version_separates_weights_changed_in_place(tmp_path):
    folder = write_checkpoint(tmp_path / "m")
    mi._identity.cache_clear()
    config = SimpleNamespace(model=str(folder))
    assert model_identity(config, "step-1").digest != model_identity(config, "step-2").digest
    assert model_identity(config, "step-1").digest == model_identity(config, "step-1").digest
    assert "model_version 'step-1'" in model_identity(config, "step-1").description


def test_only_the_files_vllm_loads_count(tmp_path):
    folder = write_checkpoint(tmp_path / "m", name="model-00001-of-00001")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    before = identity_of(folder)
    save_file({"x": np.ones(4, np.float32)}, folder / "consolidated.safetensors")  # beside the index: not loaded
    (folder / "pytorch_model.bin").write_bytes(b"other format: not loaded when safetensors exist")
    (folder / "tokenizer.json").write_text("{}")
    assert identity_of(folder) == before
    assert [f.name for f in mi.weight_files(folder)] == ["model-00001-of-00001.safetensors"]


def test_a_large_file_is_sampled_over_its_tensor_data(tmp_path, monkeypatch):
    """Above WHOLE_FILE_BYTES: the header (names, shapes, offsets) and SAMPLES windows spread over the data."""
    monkeypatch.setattr(mi, "WHOLE_FILE_BYTES", 1 << 10)
    folder = write_checkpoint(tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    first = mi.file_digest(weights)
    assert first.startswith("sampled:")

    def digest_with_byte_changed(offset: int) -> str:
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        weights.write_bytes(changed)
        return mi.file_digest(weights)

    assert digest_with_byte_changed(data_start) != first  # the first window
    assert digest_with_byte_changed(len(data) - 1) != first  # the last window
    assert digest_with_byte_changed(20) != first  # the header
    weights.write_bytes(data)
    assert mi.file_digest(weights) == first


def test_a_hugging_face_cache_file_is_named_by_its_blob(tmp_path):
    """In a Hugging Face cache a snapshot's file links to ``blobs/<sha256>``: that name is the content's hash."""
    blob_name = "a" * 64
    blobs = tmp_path / "models--org--m" / "blobs"
    snapshot = tmp_path / "models--org--m" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    write_checkpoint(tmp_path / "src")
    shutil.copy(tmp_path / "src" / "model.safetensors", blobs / blob_name)
    (snapshot / "model.safetensors").symlink_to(blobs / blob_name)
    shutil.copy(tmp_path / "src" / "config.json", snapshot / "config.json")
    assert mi.file_digest(snapshot / "model.safetensors") == f"hf-blob:{blob_name}"


def test_weights_not_on_disk_are_named_with_their_revision(tmp_path):
    name = "no-such-org/no-such-model-kvpool-test"
    assert identity_of(name, revision="r1") != identity_of(name, revision="r2")
    mi._identity.cache_clear()
    assert "named only" in model_identity(SimpleNamespace(model=name)).description


def test_random_dummy_weights_follow_the_seed(tmp_path):
    folder = write_checkpoint(tmp_path / "m")
    assert identity_of(folder, load_format="dummy", seed=0) != identity_of(folder, load_format="dummy", seed=1)
    assert identity_of(folder, load_format="dummy", seed=0) != identity_of(folder)


@pytest.mark.vllm_api
def test_vllms_model_config_gives_the_same_identity_at_two_paths_and_another_for_new_weights(tiny_model, tmp_path):
    """On every vLLM leg: the fields read from vLLM's own ``ModelConfig`` exist and behave as above."""
    from vllm.config import ModelConfig

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)

    def identity(path: Path | str) -> str:
        mi._identity.cache_clear()
        config = ModelConfig(model=str(path), dtype="float32", max_model_len=512, seed=0, enforce_eager=True)
        return model_identity(config).digest

    original = identity(tiny_model)
    assert identity(copy) == original
    rng = np.random.default_rng(3)
    from safetensors.numpy import load_file

    weights = load_file(copy / "model.safetensors")
    save_file({k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in weights.items()}, copy / "model.safetensors")
    assert identity(copy) != original


def test_a_drafter_with_layers_is_part_of_the_identity(tmp_path):
    """Speculative decoding with a drafter of its own layers (a draft model, an EAGLE head, MTP layers) stores their
    KV in the same blocks: another drafter, another key, even MTP layers of the target's own checkpoint; a drafter
    without layers (ngram) adds nothing and shares the plain blocks."""
    from kvpool_connector.engine_layout import _model_digest

    target = SimpleNamespace(model=str(write_checkpoint(tmp_path / "target", seed=0)))
    drafts = [SimpleNamespace(model=str(write_checkpoint(tmp_path / f"draft{i}", seed=i + 1))) for i in range(2)]
    mi._identity.cache_clear()

    def digest(method: str | None = None, draft=None) -> str:
        # vLLM's SpeculativeConfig as far as the digest reads it (method, draft_model_config and its two predicates)
        spec = None
        if method is not None:
            spec = SimpleNamespace(
                method=method,
                draft_model_config=draft,
                use_eagle=lambda: method in ("eagle", "eagle3", "mtp"),
                uses_draft_model=lambda: method == "draft_model",
            )
        return _model_digest(SimpleNamespace(model_config=target, speculative_config=spec), "")

    assert digest() == digest("ngram", target)
    assert len({digest(), digest("draft_model", drafts[0]), digest("draft_model", drafts[1])}) == 3
    assert digest("mtp", target) not in (digest(), digest("draft_model", target))


def _adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weights = {"lora_A.weight": rng.standard_normal((8, 16), dtype=np.float32)}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    return folder


def test_an_adapter_is_named_by_its_weights_not_its_path_and_a_rewrite_is_seen(tmp_path):
    one = mi.adapter_digest(str(_adapter(tmp_path / "a", seed=1)))
    assert mi.adapter_digest(str(_adapter(tmp_path / "copy", seed=1))) == one  # same files elsewhere
    _adapter(tmp_path / "a", seed=2)  # other weights under the same path: the file's size is the same, its time not
    assert mi.adapter_digest(str(tmp_path / "a")) != one
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["v_proj"]}))
    assert mi.adapter_digest(str(tmp_path / "a")) != mi.adapter_digest(str(tmp_path / "copy"))
