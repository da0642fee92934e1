"""Which computed prompt blocks are worth a put: saves admitted by expected reuse, decided fleet-wide in the pool.

A pool smaller than its working set keeps only what it can: every one-off prompt saved pushes out blocks that would
have been hits. With ``save_admission: "second_sight"`` a prompt block is saved the second time any instance of the
fleet computes it. The first time, only a *sighting* is recorded: a small marker object under the same layout
prefix (``keys.sighting_key``), put by the worker that holds the layout's first shard. A lookup asks for the
sightings of the blocks past its hit in the same pool call as the blocks themselves (one key more per block), so:

- a block sighted before is admitted, and so is every block before it (a hit needs the whole chain: a tail without
  its head is never loaded);
- a block never sighted gets its sighting recorded and no save; it is counted as ``save_not_admitted.first_sight``;
- a block whose sighting exists but whose object does not was evicted, or is on its second sight now: the lookup
  counts it as ``missed_blocks.seen_before``, a never-sighted one as ``missed_blocks.first_sight``.

Always admitted: a P/D producer's prompt (``do_remote_decode``: its consumer loads it), blocks of generated tokens
(``save_decode_cache``: the next turn repeats them), every save of an engine that does not look up (``kv_producer``),
and, with ``save_admission: "all"`` (the default), everything.

Calls: ``question_keys`` (the lookup's extra keys) -> ``answer`` (from the lookup's result) -> the scheduler keeps
``Sighting.admit_until`` in the request's record and plans saves and sightings with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kvpool_connector import keys

AdmissionPolicy = Literal["all", "second_sight"]
SIGHTING_BYTES = 64
"""A sighting's object size: its bytes are never read, only its existence."""


@dataclass(frozen=True)
class Sighting:
    """What a lookup learnt about the blocks past its hit."""

    admit_until: int
    """Prompt blocks below this index may be saved (the last sighted block and every block before it)."""
    first_sight: int
    """Missing blocks no instance had computed before."""
    seen_before: int
    """Missing blocks sighted before: evicted, or on their second sight now."""


class Admission:
    """One scheduler's admission policy over its layout's sightings (``shard``: the layout's first shard)."""

    def __init__(self, policy: AdmissionPolicy, shard: str) -> None:
        self.policy = policy
        self._shard = shard

    @property
    def by_sight(self) -> bool:
        return self.policy == "second_sight"

    def question_keys(self, hashes: Sequence[bytes]) -> list[str]:
        """The sighting keys a lookup of ``hashes`` asks for beside the blocks (none when every block is admitted)."""
        return [keys.sighting_key(self._shard, h) for h in hashes] if self.by_sight else []

    def answer(self, start: int, found: int, sighted: Sequence[bool]) -> Sighting | None:
        """From a lookup of blocks ``start``.. whose first ``found`` the pool holds and whose sightings were
        ``sighted``: which blocks to admit; None when every block is admitted."""
        if not self.by_sight:
            return None
        last = max((i for i, seen in enumerate(sighted) if seen), default=-1)
        missing = sighted[found:]
        return Sighting(
            admit_until=start + max(found, last + 1),
            first_sight=sum(not seen for seen in missing),
            seen_before=sum(bool(seen) for seen in missing),
        )

    @staticmethod
    def split(todo: Sequence[int], admit_until: int | None, prompt_blocks: int) -> tuple[list[int], list[int]]:
        """``todo`` block indices as (to save, to sight only): blocks of generated tokens are always saved."""
        if admit_until is None:
            return list(todo), []
        admitted = [i for i in todo if i < admit_until or i >= prompt_blocks]
        return admitted, [i for i in todo if admit_until <= i < prompt_blocks]
