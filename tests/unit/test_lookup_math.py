from hypothesis import given
from hypothesis import strategies as st

from kvpool_connector.lookup_math import matched_tokens, present_prefix_blocks, present_prefix_by_layout


def test_present_prefix_needs_every_shard():
    # 3 blocks x 2 shards, block-major: block 1 is missing on shard 1.
    assert present_prefix_blocks([True, True, True, False, True, True], 2) == 1
    assert present_prefix_blocks([True] * 6, 2) == 3
    assert present_prefix_blocks([False, True], 2) == 0
    assert present_prefix_blocks([], 1) == 0


@given(st.lists(st.booleans(), max_size=64))
def test_present_prefix_single_shard_is_leading_run(found):
    expected = next((i for i, f in enumerate(found) if not f), len(found))
    assert present_prefix_blocks(found, 1) == expected


def test_matched_tokens_cases():
    bs = 128
    # 350-token prompt, no local hit, 2 blocks in pool: 256 tokens from the pool.
    assert matched_tokens(0, 2, bs, 350, 0) == 256
    # local hit of 1 block, pool has the next block: 128 more.
    assert matched_tokens(1, 1, bs, 350, 128) == 128
    # full-prompt hit (256 tokens, 2 blocks): the last token is still computed.
    assert matched_tokens(0, 2, bs, 256, 0) == 255
    # everything local already: nothing to add.
    assert matched_tokens(2, 0, bs, 300, 256) == 0
    # prompt fully cached locally except the last token, pool has the last block: bs - 1 tokens.
    assert matched_tokens(1, 1, bs, 256, 128) == 127


@given(st.integers(0, 40), st.integers(0, 40), st.integers(1, 6000), st.sampled_from([16, 64, 128]))
def test_matched_tokens_bounds(start, found, num_tokens, bs):
    computed = min(start * bs, max(num_tokens - 1, 0))
    extra = matched_tokens(start, found, bs, num_tokens, computed)
    assert extra >= 0
    assert computed + extra <= num_tokens - 1 or extra == 0
    assert extra <= found * bs


def test_a_sliding_window_shard_needs_only_its_window_back_from_the_hits_end():
    # 5 blocks x 2 shards (full attention, a 2-block window); the windowed shard lost blocks 0-2
    full, window = [True] * 5, [False, False, False, True, True]
    found = [f for pair in zip(full, window, strict=True) for f in pair]
    assert present_prefix_blocks(found, 2, [None, 2]) == 5
    assert present_prefix_blocks(found, 2) == 0  # strict: every shard every block
    # block 3 of the window gone: the longest hit whose window is whole ends at block 2 (blocks 0-1 are gone too),
    # so the hit is the first block alone: its window reaches back to the start of the prompt
    window = [True, False, False, False, True]
    found = [f for pair in zip(full, window, strict=True) for f in pair]
    assert present_prefix_blocks(found, 2, [None, 2]) == 1
    # the full-attention shard's prefix bounds the hit
    full, window = [True, True, True, False, True], [True] * 5
    found = [f for pair in zip(full, window, strict=True) for f in pair]
    assert present_prefix_blocks(found, 2, [None, 2]) == 3


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=24), st.integers(1, 4))
def test_windowed_hits_are_the_longest_with_whole_windows(blocks, window):
    found = [f for pair in blocks for f in pair]
    hit = present_prefix_blocks(found, 2, [None, window])
    full_prefix = next((i for i, (f, _) in enumerate(blocks) if not f), len(blocks))
    whole = [end for end in range(1, full_prefix + 1) if all(w for _, w in blocks[max(0, end - window) : end])]
    assert hit == max(whole, default=0)


def test_a_block_loads_from_the_first_stored_layout_that_holds_all_of_it():
    # 3 blocks; layout 0 (this engine's, 1 shard) holds block 0; layout 1 (2 shards) holds blocks 0-2 but block 2
    # on one shard only; layout 2 (4 shards) holds block 2 whole.
    own = [True, False, False]
    half = [True, True, True, True, True, False]
    quarters = [False] * 8 + [True] * 4
    assert present_prefix_by_layout(own + half + quarters, [[0], [0, 0], [0] * 4], [None]) == (3, [[0], [1], [2]])
    assert present_prefix_by_layout(own + half, [[0], [0, 0]], [None]) == (2, [[0], [1]])
    # two KV cache groups: each block of each group from its own first full layout; a window group needs only its window
    assert present_prefix_by_layout(
        [True, False, False, False, True, True, True, True], [[0, 1], [0, 1]], [None, 1]
    ) == (2, [[0, 1], [1, 1]])


@given(st.lists(st.booleans(), max_size=48), st.integers(1, 3))
def test_one_stored_layout_reads_like_present_prefix_blocks(found, shards):
    found = found[: len(found) // shards * shards]
    hit, sources = present_prefix_by_layout(found, [[0] * shards], [None])
    assert hit == present_prefix_blocks(found, shards) and sources == [[0]] * hit
