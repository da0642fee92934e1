"""Run one vLLM CPU engine in a fresh process over a list of prompts, and report what the tests and demo compare.

Each call of :func:`run_engine` is its own process (and vLLM spawns its engine core and worker under it), so "a fresh
engine" really has nothing in memory from an earlier run: whatever it does not recompute came from the pool.

CLI (used by :func:`run_engine`): ``python -m kvpool_testkit.engine SPEC.json OUT.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass
class EngineSpec:
    model: str
    prompts: list[list[int]]  # token ids: exact lengths, independent of the tokenizer
    max_tokens: int = 12
    kv_transfer_config: dict[str, Any] | None = None
    sequential: bool = False  # one generate() per prompt, so a later prompt can hit what an earlier one saved
    enable_prefix_caching: bool = True
    max_model_len: int = 4096
    max_num_batched_tokens: int | None = None
    extra_llm_args: dict[str, Any] = field(default_factory=dict)
    logprobs: int = 0  # top logprobs per generated token (bf16 models: compare distributions, not just tokens)
    local_cache_reset_after: int | None = None
    """With ``sequential``: after this many prompts, wait for the connector's queued saves and empty vLLM's own prefix
    cache (not the pool): later prompts then hit the pool in the same engine."""
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams over the greedy ones (n: the first kept)
    cache_salts: list[str | None] = field(default_factory=list)  # per prompt, vLLM's cache_salt (none past the list)
    adapters: list[str | None] = field(default_factory=list)  # per prompt, a LoRA adapter's folder (its name: the
    # folder's name; none past the list); needs extra_llm_args enable_lora
    embeds: list[bool] = field(default_factory=list)  # per prompt: sent as its tokens' input embeddings (read from
    # the checkpoint) instead of token ids; needs extra_llm_args enable_prompt_embeds
    turns: list[list[int]] = field(default_factory=list)
    """Chat follow-ups: each prompt opens a conversation, and turn k+1's prompt is turn k's prompt + its answer +
    ``turns[k]``. Results are turn-major (every conversation's turn 1, then every turn 2, ...)."""


@dataclass
class PromptResult:
    prompt_tokens: int
    num_cached_tokens: int
    token_ids: list[int]
    ttft_s: float  # from entering the engine's queue to the first token (a lookup's and an async load's wait included)
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per generated token: top token id -> logprob


@dataclass
class EngineRun:
    results: list[PromptResult]
    log: str
    wall_s: float  # the whole process, engine start-up included
    generate_s: float  # the generate() calls only
    worker_totals: list[dict[str, float]] = field(default_factory=list)  # per rank: the connector's counters
    reset_totals: list[dict[str, float]] = field(default_factory=list)  # the same at local_cache_reset_after

    @property
    def loaded_blocks(self) -> int:
        return int(sum(t.get("loaded_blocks", 0) for t in self.worker_totals))

    @property
    def loaded_before_reset(self) -> int:
        """Blocks loaded from the pool before vLLM's prefix cache was emptied (a :func:`run_twice` first pass)."""
        return int(sum(t.get("loaded_blocks", 0) for t in self.reset_totals))

    @property
    def outputs(self) -> list[list[int]]:
        return [r.token_ids for r in self.results]


def mla_block_size() -> int:
    """The block size vLLM's CPU MLA forces here: 128 on a CPU with AMX (its AMX_MLA backend), 16 without (CPU_MLA,
    which also turns vLLM's own prefix cache off)."""
    try:
        return 128 if "amx_bf16" in Path("/proc/cpuinfo").read_text() else 16
    except OSError:
        return 16


def vllm_cache_root() -> Path:
    """vLLM's disk cache (``VLLM_CACHE_ROOT``), one per vLLM installation, shared by every engine it starts:
    ``KVPOOL_VLLM_CACHE_ROOT`` when set. vLLM keeps there only what it derives from its own code (with eager
    engines: the model-class inspection that otherwise runs in a subprocess at every start, 10 s of a 25-s engine
    start here), never KV or weights, so a fresh engine still has nothing from an earlier run."""
    if root := os.environ.get("KVPOOL_VLLM_CACHE_ROOT"):
        return Path(root)
    installation = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"kvpool-vllm-cache-{installation}"


def engine_env(extra: dict[str, str] | None = None, tp: int = 1) -> dict[str, str]:
    """The environment of a vLLM CPU engine: the shared :func:`vllm_cache_root`, offline, a small KV space; at ``tp``
    > 1 one OpenMP thread per rank on its own core (vLLM's default binding asserts on this one-NUMA-node machine)."""
    env = dict(os.environ)
    env.update(
        {
            "VLLM_CACHE_ROOT": str(vllm_cache_root()),
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1"),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    if tp > 1:
        cores = os.cpu_count() or 1
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(rank % cores) for rank in range(tp))
    env.update(extra or {})
    return env


def run_engine(
    spec: EngineSpec,
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
    python: str | None = None,
) -> EngineRun:
    """Run ``spec`` in a new process (``python``: another environment's interpreter, i.e. another vLLM release; its
    environment needs this package installed); raise with the engine log's tail if it fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.time_ns()}"
    spec_file, out_file, log_file = (workdir / f"engine-{stamp}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_file.write_text(json.dumps(asdict(spec)))
    env = dict(env or engine_env())
    args = spec.extra_llm_args
    if args.get("tensor_parallel_size", 1) * args.get("pipeline_parallel_size", 1) == 1:
        # One process, scheduler and worker in it (as vLLM runs TP 1 on a GPU): half the start-up of vLLM CPU's
        # engine-core and worker processes, and still a fresh process per run.
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    start = time.monotonic()
    with log_file.open("w") as log:
        proc = subprocess.run(
            [python or sys.executable, "-m", "kvpool_testkit.engine", str(spec_file), str(out_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    text = log_file.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"engine run failed (exit {proc.returncode}); log {log_file}:\n{text[-6000:]}")
    out = json.loads(out_file.read_text())
    results = [PromptResult(**r) for r in out["results"]]
    for r in results:  # JSON turned the token ids into strings
        r.logprobs = [{int(t): lp for t, lp in step.items()} for step in r.logprobs]
    return EngineRun(
        results=results,
        log=text,
        wall_s=time.monotonic() - start,
        generate_s=out["generate_s"],
        worker_totals=out["worker_totals"],
        reset_totals=out["reset_totals"],
    )


def run_twice(spec: EngineSpec, workdir: Path, env: dict[str, str] | None = None) -> EngineRun:
    """``spec``'s prompts computed one at a time (and saved), vLLM's own prefix cache emptied (not the pool), then
    asked again: results of both passes, the second's hits the pool's alone."""
    count = len(spec.prompts)

    def again(per_prompt: list) -> list:
        return (per_prompt + [None] * (count - len(per_prompt))) * 2 if per_prompt else []

    twice = replace(
        spec,
        prompts=list(spec.prompts) * 2,
        cache_salts=again(spec.cache_salts),
        adapters=again(spec.adapters),
        embeds=again(spec.embeds),
        sequential=True,
        local_cache_reset_after=count,
    )
    return run_engine(twice, workdir, env)


def passes(run: EngineRun) -> tuple[list[int], list[int]]:
    """A :func:`run_twice` run's cached tokens per prompt: (first pass, second pass)."""
    hits = [r.num_cached_tokens for r in run.results]
    return hits[: len(hits) // 2], hits[len(hits) // 2 :]


class PoolTotalsExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``) so a run can ask every rank what its pool connector
    moved before the engine shuts down: vLLM's shutdown may kill a worker before the connector logs its totals."""

    def kvpool_totals(self) -> dict[str, float]:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        from kvpool_connector.worker import PoolWorker

        if not has_kv_transfer_group():
            return {}
        connector = get_kv_transfer_group()
        totals: dict[str, float] = {}
        for child in getattr(connector, "_connectors", [connector]):  # MultiConnector holds its children there
            worker = getattr(child, "connector_worker", None)
            if isinstance(worker, PoolWorker):
                if worker.saver is not None:
                    worker.saver.drain(10.0)  # counted once its queued saves reached the pool
                for name, value in worker.stats.total().items():
                    totals[name] = totals.get(name, 0) + value
        return totals


def _main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig, KVTransferConfig

    spec = EngineSpec(**json.loads(Path(spec_path).read_text()))
    kwargs: dict[str, Any] = dict(
        model=spec.model,
        enforce_eager=True,
        dtype="float32",
        seed=0,
        max_model_len=spec.max_model_len,
        enable_prefix_caching=spec.enable_prefix_caching,
        disable_log_stats=False,
    )
    kwargs.update(spec.extra_llm_args)  # e.g. dtype bfloat16: vLLM's CPU MoE kernels take no float32 weights
    if isinstance(events := kwargs.get("kv_events_config"), dict):
        kwargs["kv_events_config"] = KVEventsConfig(**events)
    if spec.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = spec.max_num_batched_tokens
    if spec.kv_transfer_config is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(**spec.kv_transfer_config)
        kwargs["worker_extension_cls"] = "kvpool_testkit.engine.PoolTotalsExtension"
    llm = LLM(**kwargs)
    greedy = {"temperature": 0.0, "max_tokens": spec.max_tokens, "ignore_eos": True, "logprobs": spec.logprobs or None}
    sampling = greedy | spec.sampling
    if isinstance(structured := sampling.get("structured_outputs"), dict):
        from vllm.sampling_params import StructuredOutputsParams

        sampling["structured_outputs"] = StructuredOutputsParams(**structured)
    params = SamplingParams(**sampling)
    reset_totals: list[dict[str, float]] = []
    salts = dict(enumerate(spec.cache_salts))
    adapters = {i: _lora_request(path) for i, path in enumerate(spec.adapters) if path}
    conversations = [list(p) for p in spec.prompts]
    outputs = []
    start = time.perf_counter()
    for turn in range(len(spec.turns) + 1):
        if turn:
            answers = outputs[-len(conversations) :]
            conversations = [
                c + list(a.outputs[0].token_ids) + spec.turns[turn - 1]
                for c, a in zip(conversations, answers, strict=True)
            ]
        prompts = [
            _prompt(c, salts.get(i), i < len(spec.embeds) and spec.embeds[i], spec.model)
            for i, c in enumerate(conversations)
        ]
        loras = [adapters.get(i) for i in range(len(prompts))]
        if spec.sequential:
            for prompt, lora in zip(prompts, loras, strict=True):
                if len(outputs) == spec.local_cache_reset_after:
                    reset_totals = llm.collective_rpc("kvpool_totals")  # each rank's saves reached the pool
                    assert llm.reset_prefix_cache(), "vLLM refused to reset its prefix cache"
                outputs.append(llm.generate([prompt], params, use_tqdm=False, lora_request=lora)[0])
        else:
            outputs += llm.generate(prompts, params, use_tqdm=False, lora_request=loras if adapters else None)
    generate_s = time.perf_counter() - start
    results = []
    for out in outputs:
        m = out.metrics
        # From the engine's queue, not from scheduling: a hit loading asynchronously waits before it is scheduled.
        start_ts = (m.queued_ts or m.scheduled_ts) if m is not None else 0.0
        ttft = (m.first_token_ts - start_ts) if m is not None and m.first_token_ts else float("nan")
        results.append(
            asdict(
                PromptResult(
                    prompt_tokens=len(out.prompt_token_ids or []),
                    num_cached_tokens=int(out.num_cached_tokens or 0),
                    token_ids=list(out.outputs[0].token_ids),
                    ttft_s=ttft,
                    logprobs=[{t: lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs or []],
                )
            )
        )
    worker_totals = llm.collective_rpc("kvpool_totals") if spec.kv_transfer_config is not None else []
    Path(out_path).write_text(
        json.dumps(
            {"results": results, "generate_s": generate_s, "worker_totals": worker_totals, "reset_totals": reset_totals}
        )
    )
    llm.llm_engine.engine_core.shutdown()


def _prompt(tokens: list[int], salt: str | None, as_embeds: bool, model: str) -> Any:
    """vLLM's prompt for ``tokens``: token ids, or their input embeddings; with ``salt`` as its ``cache_salt``."""
    from vllm.inputs import EmbedsPrompt, TokensPrompt

    extra = {"cache_salt": salt} if salt else {}
    if as_embeds:
        return EmbedsPrompt(prompt_embeds=_input_embeddings(model)[tokens], **extra)
    return TokensPrompt(prompt_token_ids=tokens, **extra)


@functools.cache
def _input_embeddings(model: str) -> Any:
    from safetensors import safe_open

    for path in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if "model.embed_tokens.weight" in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                return f.get_tensor("model.embed_tokens.weight")
    raise FileNotFoundError(f"no model.embed_tokens.weight in {model}")


def _lora_request(path: str):
    """vLLM's request for the adapter in folder ``path``, named and numbered by the folder (stable across runs)."""
    from vllm.lora.request import LoRARequest

    name = Path(path).name
    return LoRARequest(name, int(hashlib.sha256(name.encode()).hexdigest()[:6], 16) + 1, path)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
