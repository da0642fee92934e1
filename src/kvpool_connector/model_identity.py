"""Which model computed a block, as one digest: the model's part of every pool key.

The pool outlives every engine, so a key must change whenever the KV a prompt produces changes, and only then:
new weights under an old path (a fine-tune redeployed under one name, a rolling update) must miss, while one
checkpoint mounted at two paths (two hosts, two cache folders) must share its blocks. The digest covers:

- the weights as vLLM loads them: each weight file's name, size and content. Files up to ``WHOLE_FILE_BYTES`` are
  hashed whole; larger ones by their safetensors header plus ``SAMPLES`` windows spread over the tensor data (a
  600 GB checkpoint costs a few MB of reads per process). A file in a Hugging Face cache is a link to a blob named
  by its content hash: that name is read, not the file;
- the checkpoint's ``config.json`` without its paths (RoPE, quantization, layer shapes), and vLLM's overrides of it;
- ``model_version`` from the connector's config, for weights changed in place where no file changes (RL weight
  syncs, ``reload_weights`` after sleep mode, updates through ``collective_rpc``).

Not covered, by design: the path, file times, the tokenizer (token ids are in vLLM's block hashes already). A
partial update that leaves every sampled window of a large file unchanged is not seen: set ``model_version``.

A LoRA adapter changes the KV of the requests that use it. vLLM's block hash names the adapter by name and path,
not by its weights, so :func:`adapter_digest` (the adapter's weight files and ``adapter_config.json``, recomputed when
a file's size or time changes) goes into the block hashes of its requests (``keys.adapter_block_hashes``): an
adapter reloaded with other weights at the same path misses.

Calls: :func:`model_identity` (once per process, cached) -> ``ModelIdentity.digest`` into ``keys.KVLayout``;
:func:`adapter_digest` per LoRA request (cached per file state).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WHOLE_FILE_BYTES = 256 << 20
"""Weight files up to this size are hashed whole (the test models, small checkpoints)."""
SAMPLES = 64
WINDOW_BYTES = 4096
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
_HF_BLOB_NAME_LENGTHS = (40, 64)  # git blob sha1, LFS sha256
_UNKEYED_CONFIG_FIELDS = ("_name_or_path", "transformers_version")  # where the model sits, which library wrote it


@dataclass(frozen=True)
class ModelIdentity:
    digest: str
    """16 hex digits; equal for equal weights, config and model_version, whatever the path."""
    description: str
    """What went in, for the start-up log line (so a fleet can compare what each instance read)."""


def model_identity(model_config: Any, model_version: str = "") -> ModelIdentity:
    """The identity of the model vLLM's ``model_config`` describes."""
    return _identity(
        str(model_config.model),
        str(getattr(model_config, "revision", None) or ""),
        str(getattr(model_config, "load_format", "") or ""),
        int(getattr(model_config, "seed", 0) or 0),
        _canonical(getattr(model_config, "hf_overrides", None)),
        str(getattr(model_config, "quantization", None) or ""),
        model_version,
    )


@functools.cache
def _identity(
    model: str, revision: str, load_format: str, seed: int, overrides: str, quantization: str, model_version: str
) -> ModelIdentity:
    parts: dict[str, Any] = {"hf_overrides": overrides, "quantization": quantization, "model_version": model_version}
    checkpoint = _local_checkpoint(model, revision)
    if str(load_format).lower().endswith("dummy"):
        # vLLM draws the weights from the seed: the files (if any) are not what runs.
        parts["weights"] = f"dummy:seed={seed}"
        what = f"random weights (load_format {load_format}, seed {seed})"
    elif checkpoint is None:
        parts["weights"] = f"name={model}:revision={revision}"
        what = f"{model!r} at revision {revision or 'default'}: no local files to read, named only"
    else:
        files = weight_files(checkpoint)
        parts["weights"] = [[f.name, f.stat().st_size, file_digest(f)] for f in files]
        what = f"{len(files)} weight file(s) of {checkpoint}"
    if checkpoint is not None and checkpoint.is_dir() and (checkpoint / "config.json").is_file():
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        parts["config"] = {k: v for k, v in config.items() if k not in _UNKEYED_CONFIG_FIELDS}
        what += " + config.json"
    if model_version:
        what += f" + model_version {model_version!r}"
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return ModelIdentity(hashlib.sha256(blob).hexdigest()[:16], what)


def adapter_digest(path: str) -> str:
    """16 hex digits naming a LoRA adapter folder's weights and config (not its path or name)."""
    folder = Path(path).expanduser()
    files = [*weight_files(folder), folder / "adapter_config.json"] if folder.is_dir() else [folder]
    state = tuple((str(f), st.st_size, st.st_mtime_ns) for f in files if f.is_file() and (st := f.stat()))
    return _adapter_digest(state)


@functools.lru_cache(maxsize=256)
def _adapter_digest(state: tuple[tuple[str, int, int], ...]) -> str:
    """By the files' (path, size, mtime) so a reload that rewrites them is read again, and nothing else is."""
    parts = [[Path(name).name, size, file_digest(Path(name))] for name, size, _ in state]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def weight_files(checkpoint: Path) -> list[Path]:
    """The files vLLM loads weights from: a GGUF file itself; else a folder's top-level ``*.safetensors`` (only those
    its index names, when it has one), else ``*.bin``, else ``*.pt``."""
    if checkpoint.is_file():
        return [checkpoint]
    for pattern in ("*.safetensors", "*.bin", "*.pt"):
        files = sorted(p for p in checkpoint.glob(pattern) if p.is_file())
        if not files:
            continue
        index = checkpoint / f"model{pattern[1:]}.index.json"
        if pattern == "*.safetensors" and index.is_file():
            named = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
            files = [f for f in files if f.name in named] or files
        return files
    return []


def file_digest(path: Path) -> str:
    """A content digest of one weight file, reading at most a few MB of it."""
    target = Path(os.path.realpath(path))
    if target.parent.name == "blobs" and len(target.name) in _HF_BLOB_NAME_LENGTHS:
        return f"hf-blob:{target.name}"
    size = target.stat().st_size
    sha = hashlib.sha256()
    with open(target, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
            return f"whole:{sha.hexdigest()}"
        data_start = _safetensors_data_start(f, size)
        f.seek(0)
        sha.update(f.read(data_start))  # tensor names, dtypes, shapes and offsets
        span = size - data_start - WINDOW_BYTES
        for i in range(SAMPLES):
            f.seek(data_start + span * i // (SAMPLES - 1))
            sha.update(f.read(WINDOW_BYTES))
    return f"sampled:{sha.hexdigest()}"


def _safetensors_data_start(f: Any, size: int) -> int:
    """Where a safetensors file's tensor data starts (after its length-prefixed JSON header); 0 for other formats."""
    prefix = f.read(8)
    if len(prefix) == 8:
        (header_len,) = struct.unpack("<Q", prefix)
        if 0 < header_len <= _MAX_HEADER_BYTES and 8 + header_len < size and f.read(1) == b"{":
            return 8 + header_len
    return 0


def _local_checkpoint(model: str, revision: str) -> Path | None:
    """The folder (or GGUF file) vLLM reads ``model`` from: the path itself, else the Hugging Face cache's snapshot
    of that repository and revision when it is there. None when the weights are not on this host's disk yet (a hub
    name vLLM has not downloaded, an object store): the model is then named, not read."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision or None, local_files_only=True))
    except Exception:  # noqa: BLE001 - not installed, not cached, not a repository name: named only
        return None


def _canonical(value: Any) -> str:
    """A stable text of vLLM's ``hf_overrides`` (a dict, or a function: its qualified name)."""
    if not value:
        return ""
    if callable(value):
        return f"callable:{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    return json.dumps(value, sort_keys=True, default=str)
