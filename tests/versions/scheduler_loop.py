"""An engine-free vLLM scheduler loop: the installed vLLM's own v1 ``Scheduler``, with MemcacheConnectorStoreV1
configured through ``kv_transfer_config`` (vLLM builds the connector's scheduler side itself), and the connector's
worker side (:class:`PoolWorker`) over CPU KV tensors shaped as vLLM's CPU backend shapes them, driven step by step
the way vLLM's model runner drives a connector. Only the forward pass is a stand-in (:class:`PageWriter`); no engine
runs, so this works on every release in the tested range, a CUDA build on a host without a GPU included.

Calls, in the order a test makes them:
1. ``SchedulerLoop(model_dir, extra_config, ...)``: the ``VllmConfig`` and ``KVCacheConfig`` an engine would build,
   the ``Scheduler``, the worker with its KV tensors registered (``register_kv_caches``);
2. ``add(req_id, prompt, max_tokens)``: a ``Request`` hashed as the engine core hashes it;
3. ``run()``: ``step()`` until the scheduler holds no request. Each step, as the model runner does:
   a. ``Scheduler.schedule()``; the runner's view of each request follows the output (:class:`RunnerRequest`):
      finished requests leave, new ones bring all their block ids (on 0.34 resumed ones too, as new requests), cached
      ones append new block ids (on 0.23 / 0.32 those in ``resumed_req_ids`` replace theirs); new blocks the
      scheduler asks to zero are zeroed and copy-on-write copies are made (0.32+);
   b. ``begin_step(meta)`` (``bind_connector_metadata``), then ``load(meta)`` (``start_load_kv``): before the forward
      pass when the step has synchronous loads (``has_sync_kv_loads``, 0.32+; always on 0.23), after it otherwise;
   c. the forward pass: :class:`PageWriter` writes the scheduled tokens' KV slots;
   d. ``save(meta)`` (``wait_for_save``);
   e. ``finished_loads``, ``take_load_errors``, ``take_stats``, ``take_stored_report`` into a ``KVConnectorOutput``
      (``get_finished`` ... ``build_connector_worker_meta``), a token sampled for every request that reached the end
      of its tokens, and ``Scheduler.update_from_output``;
   f. the oracle (``check_pages``): every position a scheduled request computed or loaded holds exactly what the
      PageWriter writes for its prefix, in every layer;
4. ``check_pool(store)``: every object the loop's saves put holds the bytes of its block's prefix; ``close()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvpool_connector import keys
from kvpool_connector.config import parse_config
from kvpool_connector.engine_layout import engine_layout
from kvpool_connector.metadata import PoolConnectorMetadata
from kvpool_connector.worker import PoolWorker
from kvpool_testkit.inspection import wait_connected
from kvpool_testkit.scheduler_side import kv_cache_config, vllm_config

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

BLOCK = 16
FIRST_TOKEN = 3  # below: the tiny model's special tokens (eos is 1); sampled tokens never stop a request early
_MASK32 = 0xFFFFFFFF


def _mix64(value: int) -> int:
    """splitmix64's finaliser: every input bit flips about half of the output bits."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


class PageWriter:
    """The stand-in for the model's forward pass. What it writes into a token's KV slot depends on the whole token
    prefix up to and including that token (a chained hash), on the layer, and on each element's place in the slot,
    so a block loaded from another prefix's key, into another page, layer or slot, or not loaded at all, reads back
    wrong. Values are written as raw 32-bit patterns (the fp32 KV tensors viewed as int32): byte-exact to compare."""

    def __init__(self, layer_names: Sequence[str], kv_caches: dict[str, torch.Tensor]) -> None:
        self.layer_names = list(layer_names)  # object order: as KVPages orders them
        self._ints = [kv_caches[name].view(torch.int32) for name in self.layer_names]
        _, heads, _, width = self._ints[0].shape
        pattern = (np.arange(heads * width, dtype=np.uint64) * 0x9E3779B1) & _MASK32
        self._pattern = pattern.astype(np.uint32).reshape(heads, width)
        self._layer_salt = [(_mix64(layer + 1) & _MASK32) for layer in range(len(self.layer_names))]
        self.weights = 0  # which weights the "model" runs with: other weights write other KV for the same tokens

    @staticmethod
    def prefix_hashes(tokens: Sequence[int], known: list[int]) -> list[int]:
        """The chained hash at each position of ``tokens``, extending ``known`` (the hashes of a shorter prefix)."""
        for token in tokens[len(known) :]:
            known.append(_mix64((known[-1] if known else 0x243F6A8885A308D3) ^ (token + 1)))
        return known

    def values(self, hashes: Sequence[int], layer: int) -> np.ndarray:
        """(positions, heads, 2*head_size) int32: the slots of ``hashes``' positions in ``layer``."""
        salt = self._layer_salt[layer] ^ (_mix64(self.weights) & _MASK32 if self.weights else 0)
        seeds = np.array([(h ^ (h >> 32)) & _MASK32 for h in hashes], dtype=np.uint32) ^ np.uint32(salt)
        return (seeds[:, None, None] ^ self._pattern[None]).view(np.int32)

    def write(self, block_ids: Sequence[int], hashes: Sequence[int], start: int, end: int) -> None:
        """The forward pass over positions [start, end) of a request with block table ``block_ids``."""
        blocks, slots = _slots(block_ids, start, end)
        for layer, kv in enumerate(self._ints):
            kv[blocks, :, slots, :] = torch.from_numpy(self.values(hashes[start:end], layer))

    def mismatches(self, block_ids: Sequence[int], hashes: Sequence[int], end: int) -> list[str]:
        """Positions [0, end) whose slot differs from what this writer writes, in any layer (one line each)."""
        if end <= 0:
            return []
        blocks, slots = _slots(block_ids, 0, end)
        wrong = []
        for layer, kv in enumerate(self._ints):
            got = kv[blocks, :, slots, :].numpy()
            bad = np.flatnonzero((got != self.values(hashes[:end], layer)).reshape(end, -1).any(axis=1))
            wrong += [f"layer {layer} position {p} (block {blocks[p]} slot {p % BLOCK})" for p in bad[:4]]
        return wrong

    def block_object(self, hashes: Sequence[int], index: int) -> bytes:
        """The bytes the pool object of a full block holds: each layer's page (heads, block, 2*head_size), in layer
        order, as KVPages lays a block object out."""
        pages = [self.values(hashes[index * BLOCK : (index + 1) * BLOCK], layer) for layer in range(len(self._ints))]
        return b"".join(np.ascontiguousarray(page.transpose(1, 0, 2)).tobytes() for page in pages)

    def next_token(self, block_ids: Sequence[int], end: int, vocab_size: int) -> int:
        """The token sampled after positions [0, end): "attention" reads every slot of them in the last layer, so
        the token depends on the KV a request holds, loaded or computed, as a real model's does."""
        blocks, slots = _slots(block_ids, 0, end)
        return _token_of(self._ints[-1][blocks, :, slots, :].numpy().tobytes(), vocab_size)

    def expected_tokens(self, prompt: Sequence[int], max_tokens: int, vocab_size: int) -> list[int]:
        """What ``next_token`` samples, step after step, from a KV cache that is always right: the greedy output
        every run of ``prompt`` must give, whatever it loaded, recomputed or was preempted for."""
        tokens, hashes = list(prompt), []
        for _ in range(max_tokens):
            self.prefix_hashes(tokens, hashes)
            tokens.append(_token_of(self.values(hashes, len(self._ints) - 1).tobytes(), vocab_size))
        return tokens[len(prompt) :]

    def zero(self, block_ids: Sequence[int]) -> None:
        for kv in self._ints:
            kv[list(block_ids)] = 0

    def copy_block(self, src: int, dst: int) -> None:
        for kv in self._ints:
            kv[dst] = kv[src]


def _token_of(context: bytes, vocab_size: int) -> int:
    digest = int.from_bytes(hashlib.blake2b(context, digest_size=8).digest(), "little")
    return FIRST_TOKEN + digest % (vocab_size - FIRST_TOKEN)


def _slots(block_ids: Sequence[int], start: int, end: int) -> tuple[list[int], list[int]]:
    positions = range(start, end)
    return [block_ids[p // BLOCK] for p in positions], [p % BLOCK for p in positions]


@dataclass
class RunnerRequest:
    """The model runner's state of one request (vLLM's ``CachedRequestState``, the parts this loop needs)."""

    req_id: str
    token_ids: list[int]  # prompt and the sampled tokens the runner knows of
    block_ids: list[int]  # the block table (one KV cache group)
    num_computed: int  # positions [0, num_computed) hold KV: loaded, hit in the prefix cache, or computed
    hashes: list[int] = field(default_factory=list)  # PageWriter's prefix hash of each known token


@dataclass
class SavePlan:
    """One block a step's plan saved: the request, its place in the request, and the prefix it holds."""

    step: int
    req_id: str
    index: int
    tokens: tuple[int, ...]


@dataclass
class LoopStats:
    """What a run did, as vLLM and the plans saw it."""

    steps: int = 0
    idle_steps: int = 0
    first_hit: dict[str, int] = field(default_factory=dict)  # num_computed_tokens when first scheduled
    external_cached: dict[str, int] = field(default_factory=dict)  # vLLM's PrefillStats.num_external_cached_tokens
    load_errors: set[int] = field(default_factory=set)
    sync_loads: int = 0  # blocks in synchronous / asynchronous load plans
    async_loads: int = 0
    resumed: Counter[str] = field(default_factory=Counter)  # resumptions after preemption, per request
    outputs: dict[str, list[int]] = field(default_factory=dict)  # generated tokens of finished requests


class SchedulerLoop:
    """vLLM's scheduler and this connector's worker side in one process, stepped as the engine core steps them."""

    def __init__(
        self,
        model_dir: str,
        extra_config: dict[str, Any],
        num_blocks: int = 64,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 1024,
        kv_role: str = "kv_both",
    ) -> None:
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        self.vllm_config = vllm_config(
            model_dir,
            extra_config,
            kv_role,
            block_size=BLOCK,
            num_blocks=num_blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
        )
        self.kv_cache_config = kv_cache_config(self.vllm_config, num_blocks)
        self.scheduler = Scheduler(
            vllm_config=self.vllm_config,
            kv_cache_config=self.kv_cache_config,
            structured_output_manager=StructuredOutputManager(self.vllm_config),
            block_size=BLOCK,
            hash_block_size=BLOCK,
            log_stats=True,
        )
        # As the engine core does: block hashes with the configured algorithm, NONE_HASH seeded for it.
        hash_fn = get_hash_fn_by_name(self.vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self._block_hasher = get_request_block_hasher(BLOCK, hash_fn)
        self.vocab_size = int(self.vllm_config.model_config.get_vocab_size())

        transfer = self.vllm_config.kv_transfer_config
        config = parse_config(transfer.kv_connector_extra_config, env={})
        layout = engine_layout(self.vllm_config, self.kv_cache_config, config.pool.model_version)
        self.shard = keys.fingerprint(layout, tp_rank=0, pp_rank=0)
        self.worker = PoolWorker(
            layout,
            self.shard,
            saves_enabled=transfer.is_kv_producer,
            num_blocks=num_blocks,
            config=config,
        )
        spec = self.kv_cache_config.kv_cache_groups[0].kv_cache_spec
        layer_names = list(self.kv_cache_config.kv_cache_groups[0].layer_names)
        # vLLM's CPU backend: one tensor per layer, (num_blocks, kv_heads, block_size, 2 * head_size).
        self.kv_caches = {
            name: torch.zeros(num_blocks, spec.num_kv_heads, BLOCK, 2 * spec.head_size, dtype=torch.float32)
            for name in layer_names
        }
        self.worker.register_kv_caches(self.kv_caches)
        assert self.worker.pages is not None
        self.writer = PageWriter(self.worker.pages.layer_names, self.kv_caches)

        self.requests: dict[str, Request] = {}
        self.runner: dict[str, RunnerRequest] = {}
        self.saves: dict[str, list[SavePlan]] = defaultdict(list)  # pool key -> every plan that saved it
        self.stats = LoopStats()
        self.problems: list[str] = []  # what the oracle and the plan checks found, one line each
        # Called once a step's plan is known, before the worker sees it: a test's fault injection may change the plan.
        self.on_step: Callable[[SchedulerOutput, PoolConnectorMetadata], None] | None = None

    def expected_tokens(self, req_id: str) -> list[int]:
        request = self.requests[req_id]
        max_tokens = request.sampling_params.max_tokens
        return self.writer.expected_tokens(request.prompt_token_ids, max_tokens, self.vocab_size)

    def wait_connected(self, timeout_s: float = 30.0) -> None:
        connector = self.scheduler.connector
        assert connector is not None, "the scheduler built no KV connector"
        side = connector.connector_scheduler
        assert side is not None and side.pool is not None and wait_connected(side.pool, timeout_s)
        assert self.worker.pool is not None and wait_connected(self.worker.pool, timeout_s)

    def settle(self, timeout_s: float = 30.0) -> None:
        """Wait until the worker's queued saves reached the pool."""
        if self.worker.saver is not None:
            assert self.worker.saver.drain(timeout_s), "queued saves did not reach the pool"

    # -- requests ---------------------------------------------------------------------------------------------
    def add(self, req_id: str, prompt: Sequence[int], max_tokens: int, **sampling: Any) -> None:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling)
        request = Request(req_id, list(prompt), params, None, block_hasher=self._block_hasher)
        self.requests[req_id] = request
        self.scheduler.add_request(request)

    def run(self, max_steps: int = 2000) -> LoopStats:
        while self.scheduler.has_requests():
            assert self.stats.steps < max_steps, f"still {self.scheduler.get_num_unfinished_requests()} requests"
            self.step()
        return self.stats

    # -- one step -----------------------------------------------------------------------------------------------
    def step(self) -> None:
        from vllm.v1.outputs import KVConnectorOutput

        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        assert isinstance(meta, PoolConnectorMetadata), type(meta)
        self.stats.steps += 1
        self.stats.idle_steps += int(meta.idle_step)
        self._apply(out)
        self._note_plan(out, meta)
        if self.on_step is not None:
            self.on_step(out, meta)

        self.worker.begin_step(meta)
        loads_first = getattr(out, "has_sync_kv_loads", True)  # 0.23 always loads before the forward pass
        if loads_first:
            self.worker.load(meta)
        for req_id, count in out.num_scheduled_tokens.items():
            state = self.runner[req_id]
            self.writer.write(state.block_ids, state.hashes, state.num_computed, state.num_computed + count)
            state.num_computed += count
        if not loads_first:
            self.worker.load(meta)
        self.worker.save(meta)

        load_errors = self.worker.take_load_errors()
        self.stats.load_errors |= load_errors
        connector_output = KVConnectorOutput(
            finished_recving=self.worker.finished_loads(meta.idle_step) or None,
            invalid_block_ids=load_errors,
            kv_connector_stats=self.worker.take_stats(),
            kv_connector_worker_meta=self.worker.take_stored_report(),
        )
        req_ids = list(out.num_scheduled_tokens)
        sampled = [self._sample(self.runner[r]) for r in req_ids]
        engine_outputs = self.scheduler.update_from_output(out, _runner_output(req_ids, sampled, connector_output))
        self._note_outputs(engine_outputs)
        self.check_pages(req_ids)

    def _apply(self, out: SchedulerOutput) -> None:
        """The model runner's ``_update_states``: what this loop's block tables and token lists learn from a step."""
        for req_id in out.finished_req_ids:
            self.runner.pop(req_id, None)
        for req_id in getattr(out, "preempted_req_ids", None) or ():
            # Its blocks are freed. 0.23 / 0.32 keep its tokens for the resumption (``resumed_req_ids``); 0.34
            # drops the request and sends it again as a new one.
            if (state := self.runner.get(req_id)) is not None:
                state.block_ids, state.num_computed = [], 0
        if zeroed := getattr(out, "new_block_ids_to_zero", None):
            self.writer.zero(zeroed)
        for copy in getattr(out, "kv_cache_block_copies", None) or ():
            self.writer.copy_block(copy.src_block_id, copy.dst_block_id)
        for new in out.scheduled_new_reqs:
            # 0.34 sends a resumed request as a new one, all its tokens in prefill_token_ids; 0.23/0.32 the prompt.
            tokens = list(getattr(new, "prefill_token_ids", None) or new.prompt_token_ids)
            if new.req_id in self.stats.first_hit:
                self.stats.resumed[new.req_id] += 1
            self.stats.first_hit.setdefault(new.req_id, new.num_computed_tokens)
            self.runner[new.req_id] = RunnerRequest(new.req_id, tokens, list(new.block_ids[0]), new.num_computed_tokens)
        cached = out.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or ()  # the runner's own reading, not the connector's
        for i, req_id in enumerate(cached.req_ids):
            state = self.runner[req_id]
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                self.stats.resumed[req_id] += 1
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            prompt_len = len(self.requests[req_id].prompt_token_ids)
            del state.token_ids[prompt_len + cached.num_output_tokens[i] :]  # outputs a failed load discarded
            state.num_computed = cached.num_computed_tokens[i]
        for req_id, count in out.num_scheduled_tokens.items():
            state = self.runner[req_id]
            assert state.num_computed + count <= len(state.token_ids), (req_id, state.num_computed, count)
            del state.hashes[len(state.token_ids) :]  # tokens are only appended or cut, never changed in place
            self.writer.prefix_hashes(state.token_ids, state.hashes)

    def _note_plan(self, out: SchedulerOutput, meta: PoolConnectorMetadata) -> None:
        """Every block a save plan names must be a full block of its request, under the key of that block's prefix;
        no key may be planned for two different prefixes."""
        self.stats.sync_loads += sum(len(t.block_ids) for t in meta.loads)
        self.stats.async_loads += sum(len(t.block_ids) for t in meta.async_loads)
        for transfer in meta.saves:
            state = self.runner[transfer.req_id]
            request = self.requests[transfer.req_id]
            for block_id, block_hash in zip(transfer.block_ids, transfer.block_hashes, strict=True):
                if block_id not in state.block_ids:
                    self.problems.append(f"{transfer.req_id}: saves block {block_id}, which it does not hold")
                    continue
                index = state.block_ids.index(block_id)
                tokens = tuple(state.token_ids[: (index + 1) * BLOCK])
                computed_after_step = state.num_computed + out.num_scheduled_tokens.get(transfer.req_id, 0)
                if computed_after_step < (index + 1) * BLOCK:
                    self.problems.append(f"{transfer.req_id}: block {index} saved before it is computed")
                if bytes(block_hash) != bytes(request.block_hashes[index]):
                    self.problems.append(f"{transfer.req_id}: block {index} saved under another block's hash")
                key = keys.pool_key(self.shard, bytes(block_hash))
                earlier = self.saves[key]
                if any(plan.tokens != tokens for plan in earlier):
                    self.problems.append(
                        f"{transfer.req_id}: block {index} saved under a key that holds another prefix"
                    )
                earlier.append(SavePlan(self.stats.steps, transfer.req_id, index, tokens))

    def _sample(self, state: RunnerRequest) -> list[int]:
        """A token for a request whose computed positions reached the end of its tokens (the model runner discards
        the sample of a partial prefill), from the KV it holds."""
        if state.num_computed < len(state.token_ids):
            return []
        token = self.writer.next_token(state.block_ids, state.num_computed, self.vocab_size)
        state.token_ids.append(token)
        return [token]

    def _note_outputs(self, engine_outputs: dict[int, Any]) -> None:
        for outputs in engine_outputs.values():
            for output in outputs.outputs:
                stats = getattr(output, "prefill_stats", None)
                if stats is not None:
                    self.stats.external_cached[output.request_id] = stats.num_external_cached_tokens
                if output.finish_reason is not None:
                    request = self.requests[output.request_id]
                    self.stats.outputs[output.request_id] = list(request.output_token_ids)

    # -- oracles ------------------------------------------------------------------------------------------------
    def check_pages(self, req_ids: Sequence[str]) -> None:
        """Every position [0, num_computed) of each of ``req_ids`` holds what the PageWriter writes for its prefix."""
        for req_id in req_ids:
            state = self.runner.get(req_id)
            if state is None:
                continue
            wrong = self.writer.mismatches(state.block_ids, state.hashes, state.num_computed)
            if wrong:
                self.problems.append(
                    f"step {self.stats.steps}: {req_id} ({state.num_computed} positions) holds wrong KV at "
                    + ", ".join(wrong[:4])
                )

    def check_pool(self, store: Any) -> int:
        """Every object this loop's saves put holds its block's bytes (``store``: a plain Mooncake client); returns
        how many were checked. Waits for queued saves first."""
        self.settle()
        for key, plans in self.saves.items():
            plan = plans[0]
            hashes = PageWriter.prefix_hashes(plan.tokens, [])
            expected = self.writer.block_object(hashes, plan.index)
            got = store.get(key)
            if got != expected:
                self.problems.append(
                    f"pool object of {plan.req_id} block {plan.index}: "
                    + ("missing" if not got else f"{len(got)} bytes, not the block's {len(expected)}")
                )
        return len(self.saves)

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()


def _runner_output(req_ids: list[str], sampled: list[list[int]], connector_output: Any) -> Any:
    """A ``ModelRunnerOutput`` on every release: 0.34 dropped ``req_id_to_index`` (the index is the position)."""
    from vllm.v1.outputs import ModelRunnerOutput

    fields: dict[str, Any] = {
        "req_ids": req_ids,
        "sampled_token_ids": sampled,
        "kv_connector_output": connector_output,
    }
    if "req_id_to_index" in {f.name for f in dataclasses.fields(ModelRunnerOutput)}:
        fields["req_id_to_index"] = {r: i for i, r in enumerate(req_ids)}
    return ModelRunnerOutput(**fields)
