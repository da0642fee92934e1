"""What the proxy decides per request: which instance of a role serves it, and whether the pool already holds its
prompt (so a P/D deployment can skip the prefill instance).

Held prompts are learned, not guessed: a prefill instance that saves a prompt's full blocks answers with a notice
(``handoff.SAVING_PARAM``: blocks, shards); the proxy remembers that notice under the prompt's identity, and a later
request with the same identity goes straight to a decode instance, carrying the notice, so the decode instance loads
the blocks (waiting for puts still in flight) and computes only the tail of less than one block. The identity is
every field of the request body except those known not to change the prompt's KV (sampling, streaming, limits): an
unknown field stays in it, so a wrong identity can only miss, never send a request to decode without its KV. A prompt
the pool evicted since is computed by the decode instance: the same answer, a slower first token.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from kvpool_connector.handoff import notice_in

Policy = Literal["round_robin", "least_outstanding"]

# Request fields that do not change which tokens are prefilled (or their KV): left out of a prompt's identity.
_NOT_PROMPT = frozenset(
    {
        "max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n",
        "best_of", "stop", "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "logprobs", "top_logprobs", "prompt_logprobs", "logit_bias", "stream", "stream_options",
        "user", "request_id", "kv_transfer_params", "include_stop_str_in_output", "skip_special_tokens",
        "spaces_between_special_tokens", "echo", "suffix", "response_format", "priority",
    }
)  # fmt: skip


@dataclass
class Instance:
    url: str
    outstanding: int = 0
    healthy: bool = True


@dataclass
class InstanceGroup:
    """Instances of one role; picks one per request by the policy, preferring healthy ones."""

    role: str
    instances: list[Instance]
    policy: Policy
    _cycle: itertools.cycle = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cycle = itertools.cycle(range(len(self.instances)))

    def pick(self) -> Instance:
        candidates = [i for i in self.instances if i.healthy] or self.instances
        if self.policy == "least_outstanding":
            return min(candidates, key=lambda i: i.outstanding)
        while True:
            instance = self.instances[next(self._cycle)]
            if instance in candidates:
                return instance


def prompt_identity(api: str, body: dict[str, Any]) -> str:
    """A digest of everything in ``body`` that can change the prompt's tokens (model, prompt or messages, chat
    template, salt, ...)."""
    kept = {k: v for k, v in body.items() if k not in _NOT_PROMPT}
    text = json.dumps([api, kept], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class HeldPrompts:
    """Prompts a prefill instance said it saved to the pool, newest last, at most ``capacity`` (least recently
    used dropped), each for at most ``max_age_s`` (the pool may evict it meanwhile)."""

    def __init__(self, capacity: int, max_age_s: float) -> None:
        self._capacity = capacity
        self._max_age_s = max_age_s
        self._notices: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def remember(self, identity: str, kv_transfer_params: dict[str, Any] | None) -> None:
        notice = notice_in(kv_transfer_params)
        if self._capacity <= 0 or notice is None or not notice.get("blocks"):
            return  # nothing saved (a prompt shorter than a block, saves off, another connector)
        self._notices[identity] = (time.monotonic(), notice)
        self._notices.move_to_end(identity)
        while len(self._notices) > self._capacity:
            self._notices.popitem(last=False)

    def notice(self, identity: str) -> dict[str, Any] | None:
        """The saving notice of a held prompt, or None."""
        entry = self._notices.get(identity)
        if entry is None:
            return None
        if time.monotonic() - entry[0] > self._max_age_s:
            del self._notices[identity]
            return None
        self._notices.move_to_end(identity)
        return entry[1]

    def __len__(self) -> int:
        return len(self._notices)
