"""The proxy's choices: which instance serves a request, what identifies a prompt, which prompts the pool holds."""

from __future__ import annotations

import pytest

from kvpool_connector import routing
from kvpool_connector.handoff import SAVING_PARAM
from kvpool_connector.proxy import ProxyConfig
from kvpool_connector.routing import HeldPrompts, Instance, InstanceGroup, prompt_identity


def _group(policy: routing.Policy, n: int = 3) -> InstanceGroup:
    return InstanceGroup("instances", [Instance(f"http://i{k}") for k in range(n)], policy)


def test_round_robin_takes_turns_and_passes_over_unhealthy_instances():
    group = _group("round_robin")
    assert [group.pick().url for _ in range(4)] == ["http://i0", "http://i1", "http://i2", "http://i0"]
    group.instances[2].healthy = False
    assert [group.pick().url for _ in range(4)] == ["http://i1", "http://i0", "http://i1", "http://i0"]
    for instance in group.instances:
        instance.healthy = False
    # none healthy: every instance in turn (the request itself reports the failure)
    assert sorted(group.pick().url for _ in range(3)) == ["http://i0", "http://i1", "http://i2"]


def test_least_outstanding_takes_the_least_busy_healthy_instance():
    group = _group("least_outstanding")
    group.instances[0].outstanding, group.instances[1].outstanding, group.instances[2].outstanding = 3, 1, 0
    assert group.pick().url == "http://i2"
    group.instances[2].healthy = False
    assert group.pick().url == "http://i1"


def test_prompt_identity_ignores_sampling_and_keeps_everything_else():
    body = {"model": "m", "prompt": "p", "max_tokens": 4, "temperature": 0.0}
    same = {"model": "m", "prompt": "p", "max_tokens": 99, "temperature": 1.0, "seed": 3, "stream": True}
    assert prompt_identity("/completions", body) == prompt_identity("/completions", same)
    for changed in ({"prompt": "q"}, {"model": "n"}, {"cache_salt": "s"}, {"some_new_field": 1}):
        assert prompt_identity("/completions", body) != prompt_identity("/completions", {**body, **changed}), changed
    assert prompt_identity("/completions", body) != prompt_identity("/chat/completions", body)


def _notice(blocks: int) -> dict:
    return {SAVING_PARAM: {"blocks": blocks, "shards": ["s"]}}


def test_held_prompts_remember_saved_prompts_least_recently_used_out():
    held = HeldPrompts(capacity=2, max_age_s=60)
    held.remember("a", _notice(3))
    held.remember("b", _notice(1))
    assert held.notice("a") == {"blocks": 3, "shards": ["s"]}  # a is now the most recent
    held.remember("c", _notice(2))
    assert held.notice("b") is None and held.notice("a") is not None and held.notice("c") is not None
    assert len(held) == 2


@pytest.mark.parametrize("params", [None, {}, _notice(0), {SAVING_PARAM: "not a notice"}, {"do_remote_decode": True}])
def test_held_prompts_ignore_answers_that_saved_nothing(params):
    held = HeldPrompts(capacity=8, max_age_s=60)
    held.remember("a", params)
    assert held.notice("a") is None and len(held) == 0


def test_held_prompts_forget_after_their_age_and_when_disabled(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(routing.time, "monotonic", lambda: now[0])
    held = HeldPrompts(capacity=8, max_age_s=10)
    held.remember("a", _notice(1))
    now[0] += 9
    assert held.notice("a") is not None
    now[0] += 2
    assert held.notice("a") is None and len(held) == 0
    disabled = HeldPrompts(capacity=0, max_age_s=10)
    disabled.remember("a", _notice(1))
    assert disabled.notice("a") is None


def test_proxy_config_names_the_mode_it_needs():
    assert ProxyConfig(instances=["http://a"]).disaggregated is False
    assert ProxyConfig(prefill=["http://a"], decode=["http://b"]).disaggregated is True
    with pytest.raises(ValueError, match="not both"):
        ProxyConfig(instances=["http://a"], prefill=["http://b"], decode=["http://c"])
    with pytest.raises(ValueError, match="--decode"):
        ProxyConfig(prefill=["http://a"])
    with pytest.raises(ValueError, match="least_outstanding"):
        ProxyConfig(instances=["http://a"], policy="random")  # type: ignore[arg-type]
