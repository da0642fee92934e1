"""The P/D hand-off through the pool: a prefill instance (the producer) tells the decode instance (the consumer),
through whoever relays its answer (the proxy), which prompt blocks it is saving, so the consumer waits a bounded time
for puts still in flight instead of recomputing them.

The notice, in ``kv_transfer_params``: ``{SAVING_PARAM: {"blocks": n, "shards": [...]}}``. ``blocks``: the prompt's
full blocks the producer saves, from block 0; ``shards``: the producer's shard fingerprints (every shard of its
layout, in ``keys.shard_fingerprints`` order), so a consumer can tell whether it reads that layout. The shape is JSON
(it crosses HTTP through the proxy); nothing here imports vLLM, so the proxy imports it too.

Calls, in the order a P/D request makes them:
1. the producer's scheduler, ``request_finished`` of a ``do_remote_decode`` request: ``saving_params(blocks, shards)``;
2. the proxy (``routing.HeldPrompts``): ``notice_in(params)``, remembered under the prompt's identity and relayed
   as it came, under ``SAVING_PARAM``, to a decode instance of a later request with that identity;
3. the consumer's scheduler: ``notice_in`` (is there one at all), then ``producer_wait(params, readable_shards,
   wait_s)`` for a notice it can use, polled with ``ProducerWait.pause`` until the blocks are in or its deadline.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SAVING_PARAM = "kvpool_saving"
"""The producer's notice in ``kv_transfer_params``: ``{"blocks": n, "shards": [...]}``, the prompt blocks it saves."""

POLL_PAUSE_MAX_S = 0.02
"""Longest pause between two existence queries of a consumer waiting for its producer's blocks: a put that lands
while the consumer pauses is seen at most this much later."""


def saving_params(blocks: int, shards: Sequence[str]) -> dict[str, Any]:
    """The ``kv_transfer_params`` that carry a producer's notice."""
    return {SAVING_PARAM: {"blocks": blocks, "shards": shards}}


def notice_in(kv_transfer_params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The notice in a request's ``kv_transfer_params`` as sent (a dict), or None; its fields are not checked."""
    notice = (kv_transfer_params or {}).get(SAVING_PARAM)
    return notice if isinstance(notice, dict) else None


@dataclass
class ProducerWait:
    """A consumer's request whose producer said it is saving ``blocks`` prompt blocks to the pool.

    vLLM asks a waiting request again every step, and with nothing to run a step comes about every millisecond, each
    an empty forward call on every rank: the engine spins, and a new existence query each time would keep the pool's
    master busy too, while the producer, often on the same host, needs those cores to finish its puts (on a small
    host the spinning can starve the pool node's heartbeat, and the master then drops the node with the producer's
    puts). So the pool is asked again only after a pause that grows with the wait so far (a quarter of it, between
    1 ms and ``POLL_PAUSE_MAX_S``), and an engine with nothing running waits the pause out in its idle step instead
    of stepping: a put that lands within milliseconds is seen at once, a slow one costs at most one pause more."""

    blocks: int  # the producer's saved prompt blocks; 0 once the wait expired (take what is there)
    deadline: float  # time.monotonic() past which the blocks still missing are computed
    started: float = field(default_factory=time.monotonic)
    next_poll: float = 0.0  # no new query before this

    def pause(self, now: float) -> None:
        self.next_poll = now + min(POLL_PAUSE_MAX_S, max(0.001, (now - self.started) / 4))


def producer_wait(
    kv_transfer_params: Mapping[str, Any] | None, readable_shards: Sequence[Sequence[str]], wait_s: float
) -> ProducerWait | None:
    """The wait for a producer's blocks, when the notice is one this engine can use: its shards are a layout this
    engine reads (same model, a readable parallel layout), and no point-to-point partner delivers the KV instead
    (``do_remote_prefill``, a MultiConnector's other half). None otherwise."""
    notice = notice_in(kv_transfer_params)
    if notice is None or (kv_transfer_params or {}).get("do_remote_prefill"):
        return None
    if notice.get("shards") not in readable_shards or not isinstance(notice.get("blocks"), int):
        return None  # another model, or a layout this engine does not read: its blocks are not ours to wait for
    return ProducerWait(notice["blocks"], time.monotonic() + wait_s)
