"""What the scheduler side keeps about one request, from its first lookup to ``request_finished``: one record, so
forgetting a request is one ``pop``. The lookup (``lookups.PrefixLookup``), the save planner (``save_planning``)
and the P/D hand-off (``handoff.ProducerWait``) each read and write their own fields of it.

``pool_block_hashes(request, num_blocks, block_size, hash_block_size)``: the variable part of the pool keys of a
request's first ``num_blocks`` blocks, the same for its lookup and its saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvpool_connector import keys
from kvpool_connector.metadata import BlockTransfer, group_blocks
from kvpool_connector.model_identity import adapter_digest

if TYPE_CHECKING:
    from vllm.v1.request import Request

    from kvpool_connector.admission import Sighting
    from kvpool_connector.handoff import ProducerWait
    from kvpool_connector.lookups import Lookup


@dataclass
class LoadAnswer:
    """The latest lookup's hit, kept for ``update_state_after_alloc`` to turn into a load of the allocated blocks."""

    start_block: int  # the first block past vLLM's local prefix hit
    num_blocks: int  # blocks from there the pool holds
    block_hashes: list[bytes]  # theirs
    load_async: bool
    sources: list[list[int]]  # per block and KV cache group: the stored TP size it loads from

    def load(
        self, req_id: str, block_ids: list[list[int]], num_tokens: int, block_size: int, own_tp: int
    ) -> tuple[range, BlockTransfer]:
        """The blocks of this hit vLLM allocated for ``num_tokens`` external tokens (their indices), and their load
        into ``block_ids`` (per KV cache group, as vLLM allocated them; ``own_tp``: this engine's TP size)."""
        count = min(-(-num_tokens // block_size), self.num_blocks)
        indices = range(self.start_block, self.start_block + count)
        return indices, group_blocks(req_id, block_ids, indices, self.block_hashes, self.sources, own_tp)


@dataclass
class RequestState:
    request: Request
    block_ids: list[list[int]] = field(default_factory=list)  # per KV cache group, once vLLM allocated them
    next_save_block: int = 0  # prompt blocks below this are planned, saved, or known to be in the pool
    loaded: range = range(0)  # block indices that came from the pool: no need to save them back
    answer: LoadAnswer | None = None  # the latest lookup's answer, for update_state_after_alloc
    asked_tokens: int | None = None  # the latest lookup's tokens past the local hit, counted once allocated
    lookup: Lookup | None = None  # an asynchronous existence query, asked or answered
    producer_wait: ProducerWait | None = None  # its prefill instance is still saving its blocks
    loading: set[int] = field(default_factory=set)  # blocks of its asynchronous load in flight
    load_failed: bool = False  # its asynchronous load failed: no second try
    sighting: Sighting | None = None  # the latest lookup's admission answer; None: every block is admitted
    unanswered_blocks: int = 0  # the latest lookup's blocks the pool gave no answer for (unavailable, too slow)

    def forget_lookup(self) -> None:
        if self.lookup is not None:
            self.lookup.future.cancel()
            self.lookup = None


def pool_block_hashes(request: Request, num_blocks: int, block_size: int, hash_block_size: int) -> list[bytes]:
    """The hashes the pool keys of the request's first ``num_blocks`` blocks end in: vLLM's block hashes at the pool's
    block size, and a LoRA adapter's weights in them (an adapter rewritten under its name and path then misses)."""
    hashes = keys.block_hashes(request.block_hashes, block_size, hash_block_size, num_blocks)
    if (lora := request.lora_request) is not None:
        return keys.adapter_block_hashes(hashes, adapter_digest(lora.lora_path))
    return hashes
