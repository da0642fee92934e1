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


def distinct_prompts(count: int, length: int, vocab: int = 2000, seed: int = 1) -> list[list[int]]:
    """``count`` random token-id prompts of ``length`` tokens that share no block with each other."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def shared_prefix_prompts(
    prefixes: int, per_prefix: int, prefix_len: int, suffix_len: int, vocab: int = 2000, seed: int = 2
) -> list[list[int]]:
    """``prefixes`` groups of prompts; the prompts of a group share their first ``prefix_len`` tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(prefixes):
        head = [rng.randrange(3, vocab) for _ in range(prefix_len)]
        out += [head + [rng.randrange(3, vocab) for _ in range(suffix_len)] for _ in range(per_prefix)]
    return out


def expected_pool_hits(prompts: list[list[int]], block_size: int = 128) -> list[int]:
    """Tokens a fresh engine should take from a pool that holds every full prompt block."""
    hits = []
    for p in prompts:
        full = len(p) // block_size * block_size
        hits.append(min(full, len(p) - 1) if full else 0)
    return hits


# The user's validation requests (seed guide, section 5), sent as /v1/completions with temperature 0.
SEED_SHORT_PROMPT = "Hello. I have a question. The president of the United States is"
SEED_LONG_PROMPT = (
    "Given the accelerating impacts of climate change—including rising sea levels, increasing frequency of extreme "
    "weather events, loss of biodiversity, and adverse effects on agriculture and human health—there is an urgent "
    "need for a robust, globally coordinated response. However, international efforts are complicated by a range of "
    "factors: economic disparities between high-income and low-income countries, differing levels of "
    "industrialization, varying access to clean energy technologies, and divergent political systems that influence "
    "climate policy implementation. In this context, how can global agreements like the Paris Accord be redesigned "
    "or strengthened to not only encourage but effectively enforce emission reduction targets? Furthermore, what "
    "mechanisms can be introduced to promote fair and transparent technology transfer, provide adequate financial "
    "support for climate adaptation in vulnerable regions, and hold nations accountable without exacerbating "
    "existing geopolitical tensions or disproportionately burdening those with historically lower emissions?"
)
SEED_REQUESTS = [
    (SEED_SHORT_PROMPT, 200),
    (SEED_LONG_PROMPT, 256),
]  # (prompt, max_tokens) as the field's validation guide sends them
