"""Deterministic token-id prompts that cover the cases a KV pool must get right."""

from __future__ import annotations

import random


def standard_prompts(block_size: int = 128, vocab: int = 2000, seed: int = 0) -> list[list[int]]:
    """Four prompts: two sharing a prefix (lengths not multiples of the block), an exact multiple (a full-prompt
    hit must still compute its last token), and one shorter than a block (never stored)."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    prefix = tokens(2 * block_size + 44)
    return [
        prefix + tokens(50),  # 350 tokens: 2 full blocks
        prefix + tokens(200),  # 500 tokens: shares 2 blocks with the first, 3 full blocks
        tokens(2 * block_size),  # exactly 2 blocks
        tokens(3),  # shorter than a block
    ]


def expected_pool_hits(prompts: list[list[int]], block_size: int = 128) -> list[int]:
    """Tokens a fresh engine should take from a pool that holds every full prompt block."""
    hits = []
    for p in prompts:
        full = len(p) // block_size * block_size
        hits.append(min(full, len(p) - 1) if full else 0)
    return hits
