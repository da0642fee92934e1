"""Admission by sighting: which blocks a lookup's answer admits, and how a step's blocks split into saves and
sightings."""

from __future__ import annotations

from kvpool_connector.admission import Admission, Sighting

SHARD = "0123456789abcdef"


def test_all_admits_every_block_and_asks_nothing_more():
    admission = Admission("all", SHARD)
    assert admission.question_keys([b"\x01", b"\x02"]) == []
    assert admission.answer(0, 0, []) is None
    assert Admission.split([0, 1, 2], None, prompt_blocks=3) == ([0, 1, 2], [])


def test_sightings_are_asked_beside_the_blocks_under_the_layouts_prefix():
    keys = Admission("second_sight", SHARD).question_keys([b"\xab", b"\xcd"])
    assert keys == [f"kvp1/{SHARD}/seen/ab", f"kvp1/{SHARD}/seen/cd"]


def test_the_last_sighted_block_admits_every_block_before_it():
    """A hit needs the whole chain: a sighted block 3 admits an unsighted block 2 (its sighting evicted, say)."""
    answer = Admission("second_sight", SHARD).answer(start=2, found=1, sighted=[True, False, True, False, False])
    assert answer == Sighting(admit_until=2 + 3, first_sight=3, seen_before=1)


def test_a_first_sight_admits_only_the_hit_and_a_timeout_admits_nothing():
    admission = Admission("second_sight", SHARD)
    assert admission.answer(0, 2, [True, True, False, False]).admit_until == 2
    assert admission.answer(4, 0, []) == Sighting(admit_until=4, first_sight=0, seen_before=0)


def test_a_step_splits_into_admitted_saves_and_first_sightings():
    # prompt blocks 0-3, blocks 4-5 of generated tokens (save_decode_cache): always saved
    assert Admission.split([1, 2, 3, 4, 5], admit_until=2, prompt_blocks=4) == ([1, 4, 5], [2, 3])
