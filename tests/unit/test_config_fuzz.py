"""Fuzzed configuration: whatever a user writes into ``kv_connector_extra_config`` or a pool config file, the connector
either accepts it or raises one ConfigError naming what was wrong; never another exception from deep inside."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpool_connector.backends import BACKENDS, backend_type
from kvpool_connector.backends.mooncake_settings import MooncakeSettings
from kvpool_connector.config import ConfigError, PoolConfig, ResolvedConfig, parse_config, parse_size

MOONCAKE = {"master_server_address": "127.0.0.1:50088"}
BASE = {"backend": "mooncake", "mooncake": MOONCAKE}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["0", "512MB", "1e999", "9" * 400 + "TB", "tcp://h:1", "", " ", "-5", "nan", "inf"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)


def parse_or_config_error(extra: object, env: dict[str, str]) -> ResolvedConfig | ConfigError:
    try:
        return parse_config(extra, env=env)  # type: ignore[arg-type]
    except ConfigError as exc:
        assert "\n" not in str(exc).strip(), "one line"
        return exc


def assert_usable(cfg: ResolvedConfig) -> None:
    """An accepted config has values the connector can run with."""
    pool = cfg.pool
    assert pool.lookup_timeout_ms > 0 and math.isfinite(pool.lookup_timeout_ms)
    assert pool.reconnect_interval_s > 0 and math.isfinite(pool.reconnect_interval_s)
    assert pool.staging_buffer_mb > 0 and pool.instance_id >= 0
    settings = cfg.backend_settings
    if isinstance(settings, MooncakeSettings):  # each size means what it says, as the reference below reads it
        assert settings.buffer_bytes == reference_size(settings.local_buffer_size)
        assert settings.shared_buffer_bytes == reference_size(settings.shared_buffer_size)


SIZE_SUFFIXES = {"": 1, "b": 1} | {
    letter + rest: 1 << (10 * power) for power, letter in enumerate("kmgt", start=1) for rest in ("", "b", "i", "ib")
}
"""Every suffix a size may carry (case-insensitive), spelled out: the reference the parser is checked against."""


def reference_size(value: int | str) -> int | None:
    """Bytes of a size as the documentation defines it (an int is bytes; an ASCII decimal number with one of
    SIZE_SUFFIXES, "4Gi" as in Kubernetes included, blanks around), or None if it is not one: independent of
    config.parse_size."""
    if isinstance(value, int):
        return value if 0 <= value <= 1 << 60 else None
    text = value.strip(" \t\n\r\f\v").lower()
    for suffix in sorted(SIZE_SUFFIXES, key=len, reverse=True):
        number = text.removesuffix(suffix).rstrip(" \t\n\r\f\v") if text.endswith(suffix) else None
        if number and all(part.isdigit() and part.isascii() for part in number.split(".", 1)) and number[0] != ".":
            if number.endswith("."):
                return None
            size = int(Decimal(number) * SIZE_SUFFIXES[suffix])
            return size if size <= 1 << 60 else None
    return None


@FUZZ
@given(
    value=st.from_regex(r"\s?\d{1,4}(\.\d{1,3})?\s?([kKmMgGtT][iI]?)?[bB]?\s?", fullmatch=True)
    | st.text(max_size=8)
    | st.integers(min_value=-5, max_value=2**61)
)
def test_a_size_means_what_it_says_or_is_refused_naming_the_key(value):
    expected = reference_size(value)
    try:
        assert parse_size(value, "the_key") == expected
    except ConfigError as exc:
        assert expected is None and "the_key" in str(exc), (value, expected)


CONNECTOR_KEYS = [*PoolConfig.__struct_fields__, *(k for name in BACKENDS for k in backend_type(name).config_keys)]
"""Every key of ``kv_connector_extra_config``: the common ones and each backend's."""


@FUZZ
@given(key=st.sampled_from([*CONNECTOR_KEYS, "unknown_key"]), value=json_values)
def test_any_value_for_a_connector_key(key, value):
    result = parse_or_config_error({**BASE, key: value}, env={})
    if isinstance(result, ConfigError):
        assert key in str(result) or "MMC_LOCAL_CONFIG_PATH" in str(result), str(result)
    else:
        assert_usable(result)


@FUZZ
@given(key=st.sampled_from([*MooncakeSettings.__struct_fields__, "unknown_key"]), value=json_values)
def test_any_value_for_a_mooncake_key(key, value):
    result = parse_or_config_error({"backend": "mooncake", "mooncake": {**MOONCAKE, key: value}}, env={})
    if isinstance(result, ConfigError):
        assert key in str(result), str(result)
    else:
        assert_usable(result)


@FUZZ
@given(extra=json_values)
def test_any_json_as_the_whole_extra_config(extra):
    result = parse_or_config_error(extra, env={})
    if not isinstance(result, ConfigError):
        assert_usable(result)


@FUZZ
@given(content=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_mooncake_config_file(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "mooncake.json"
    path.write_bytes(content)
    result = parse_or_config_error({"backend": "mooncake"}, env={"MOONCAKE_CONFIG_PATH": str(path)})
    if isinstance(result, ConfigError):
        assert "MOONCAKE_CONFIG_PATH" in str(result)
    else:
        assert_usable(result)


@FUZZ
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_memcache_local_config_file(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "mmc-local.conf"
    path.write_bytes(content)
    result = parse_or_config_error({}, env={"MMC_LOCAL_CONFIG_PATH": str(path)})
    if isinstance(result, ConfigError):
        assert "MMC_LOCAL_CONFIG_PATH" in str(result)


@pytest.mark.parametrize("name", ["empty", "huge", "directory"])
def test_config_files_empty_huge_or_not_a_file(tmp_path: Path, name):
    path = tmp_path / "mooncake.json"
    if name == "empty":
        path.write_text("")
    elif name == "huge":  # 20 MB of valid JSON: read and rejected for its unknown keys... or accepted, never slow
        path.write_text(json.dumps({**MOONCAKE, "padding": "x" * (20 << 20)}))
    else:
        path.mkdir()
    result = parse_or_config_error({"backend": "mooncake"}, env={"MOONCAKE_CONFIG_PATH": str(path)})
    if name == "huge":
        assert isinstance(result, ResolvedConfig)  # other users' keys in the shared file are ignored
    else:
        assert isinstance(result, ConfigError) and "MOONCAKE_CONFIG_PATH" in str(result)


@pytest.mark.parametrize(
    "key", ["lookup_timeout_ms", "reconnect_interval_s", "staging_buffer_mb", "memcache_device_id"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -1, 0.5, 2**70, "5"])
def test_numbers_out_of_range_name_the_key(key, value):
    result = parse_or_config_error({**BASE, key: value}, env={})
    if key == "reconnect_interval_s" and value == 0.5:
        assert isinstance(result, ResolvedConfig)
    else:
        assert isinstance(result, ConfigError) and key in str(result), result
