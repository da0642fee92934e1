import json

import pytest

from kvpool_connector.config import ConfigError, PoolConfig, parse_config, parse_size

ASCEND_PRODUCER = {"use_layerwise": False, "memcache_rpc_port": "0"}
MOONCAKE = {"master_server_address": "127.0.0.1:50088"}


def test_vllm_ascend_config_with_memcache_file(tmp_path):
    conf = tmp_path / "config_npu0.conf"
    conf.write_text(
        "# comment\nock.mmc.meta_service_url = tcp://127.0.0.1:5000\nock.mmc.local_service.dram.size = 1GB\n"
    )
    cfg = parse_config(ASCEND_PRODUCER, env={"MMC_LOCAL_CONFIG_PATH": str(conf)})
    assert cfg.pool.backend == "memcache"
    assert cfg.pool.instance_id == 0
    assert cfg.backend_settings.meta_service_url == "tcp://127.0.0.1:5000"


def test_mooncake_from_a_shared_json_file_ignores_other_users_keys(tmp_path):
    path = tmp_path / "mooncake.json"
    shared = {
        "local_hostname": "127.0.0.1",
        "metadata_server": "P2PHANDSHAKE",
        "protocol": "ascend",
        "device_name": "",
        "master_server_address": "127.0.0.1:50088",
        "use_ascend_direct": True,
    }
    path.write_text(json.dumps(shared))
    cfg = parse_config({**ASCEND_PRODUCER, "backend": "mooncake"}, env={"MOONCAKE_CONFIG_PATH": str(path)})
    assert cfg.backend_settings.protocol == "ascend"
    assert cfg.backend_settings.master_server_address == "127.0.0.1:50088"


def test_inline_mooncake_wins_over_env_file(tmp_path):
    cfg = parse_config(
        {"backend": "mooncake", "mooncake": {**MOONCAKE, "global_segment_size": "512MB"}},
        env={"MOONCAKE_CONFIG_PATH": str(tmp_path / "absent.json")},
    )
    assert cfg.backend_settings.segment_bytes == 512 << 20


@pytest.mark.parametrize(
    ("extra", "env", "must_name"),
    [
        ({"backnd": "mooncake"}, {}, "backnd"),
        ({"backend": "redis"}, {}, "memcache, mooncake"),
        ({"use_layerwise": "false"}, {}, "use_layerwise"),
        ({"use_layerwise": True}, {}, "use_layerwise"),
        ({"memcache_rpc_port": "port0"}, {}, "memcache_rpc_port"),
        ({"memcache_rpc_port": -1}, {}, "memcache_rpc_port"),
        ({"lookup_timeout_ms": 0}, {}, "lookup_timeout_ms"),
        ({"backend": "mooncake"}, {}, "master_server_address"),
        ({"backend": "mooncake", "mooncake": {}}, {}, "master_server_address"),
        ({"backend": "mooncake", "mooncake": {"master_server_address": "nohost"}}, {}, "master_server_address"),
        ({"backend": "mooncake", "mooncake": {**MOONCAKE, "segment": 1}}, {}, "segment"),
        ({"backend": "mooncake", "mooncake": {**MOONCAKE, "global_segment_size": "lots"}}, {}, "global_segment_size"),
        ({"backend": "mooncake", "mooncake": {**MOONCAKE, "protocol": 7}}, {}, "protocol"),
        ({"backend": "mooncake", "mooncake": {**MOONCAKE, "real_client_address": "50052"}}, {}, "real_client_address"),
        ({"backend": "mooncake", "mooncake": {**MOONCAKE, "shared_buffer_size": "64KB"}}, {}, "shared_buffer_size"),
        ({"backend": "mooncake", "mooncake": {**MOONCAKE, "shared_buffer_size": "big"}}, {}, "shared_buffer_size"),
        ({"backend": "mooncake", "mooncake": {**MOONCAKE, "transfer_stall_timeout_s": 0}}, {}, "stall_timeout"),
        ({"backend": "mooncake", "mooncake": {**MOONCAKE, "transfer_stall_timeout_s": "5"}}, {}, "stall_timeout"),
        ({"backend": "mooncake"}, {"MOONCAKE_CONFIG_PATH": "/nonexistent/mooncake.json"}, "MOONCAKE_CONFIG_PATH"),
        ({}, {}, "MMC_LOCAL_CONFIG_PATH"),
        ({}, {"MMC_LOCAL_CONFIG_PATH": "/nonexistent/mmc.conf"}, "MMC_LOCAL_CONFIG_PATH"),
    ],
)
def test_bad_config_names_the_key(extra, env, must_name):
    with pytest.raises(ConfigError) as err:
        parse_config(extra, env=env)
    assert must_name in str(err.value)


def test_mooncake_file_that_is_not_json(tmp_path):
    path = tmp_path / "mooncake.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_config({"backend": "mooncake"}, env={"MOONCAKE_CONFIG_PATH": str(path)})


def test_mooncake_file_that_is_a_list(tmp_path):
    path = tmp_path / "mooncake.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        parse_config({"backend": "mooncake"}, env={"MOONCAKE_CONFIG_PATH": str(path)})


def test_memcache_file_without_meta_url(tmp_path):
    conf = tmp_path / "mmc.conf"
    conf.write_text("ock.mmc.log_level = info\n")
    with pytest.raises(ConfigError, match="meta_service_url"):
        parse_config({}, env={"MMC_LOCAL_CONFIG_PATH": str(conf)})


def test_memcache_file_with_garbage_line(tmp_path):
    conf = tmp_path / "mmc.conf"
    conf.write_text("ock.mmc.meta_service_url = tcp://127.0.0.1:5000\nthis line has no equals sign\n")
    with pytest.raises(ConfigError, match="line 2"):
        parse_config({}, env={"MMC_LOCAL_CONFIG_PATH": str(conf)})


def test_extra_config_must_be_an_object():
    with pytest.raises(ConfigError, match="JSON object"):
        parse_config(["backend"], env={})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MB", 512 << 20), ("4 GB", 4 << 30), ("1.5g", 3 << 29), ("1024", 1024), (2048, 2048), ("16 KiB", 16 << 10)],
)
def test_parse_size(text, expected):
    assert parse_size(text, "k") == expected


def test_config_is_frozen():
    cfg = PoolConfig()
    with pytest.raises(AttributeError):
        cfg.backend = "mooncake"  # type: ignore[misc]


def test_mooncake_master_env_overrides_the_address():
    extra = {"backend": "mooncake", "mooncake": {"master_server_address": "127.0.0.1:50051"}}
    assert parse_config(extra, env={"MOONCAKE_MASTER": "10.1.2.3:6000"}).backend_settings.master_server_address == (
        "10.1.2.3:6000"
    )
    with pytest.raises(ConfigError, match="MOONCAKE_MASTER='nope'"):
        parse_config(extra, env={"MOONCAKE_MASTER": "nope"})


def test_peer_key_of_the_same_meaning_is_read_as_ours_with_a_note():
    cfg = parse_config({"backend": "mooncake", "mooncake": MOONCAKE, "lookup_rpc_port": "3"}, env={})
    assert cfg.pool.instance_id == 3
    assert cfg.notes == ("`lookup_rpc_port` read as `memcache_rpc_port` (same meaning)",)


@pytest.mark.parametrize(("key", "value"), [("consumer_is_to_load", True), ("consumer_is_to_put", False),
                                            ("discard_partial_chunks", True)])  # fmt: skip
def test_peer_key_whose_value_is_what_we_do_is_accepted(key, value):
    cfg = parse_config({"backend": "mooncake", "mooncake": MOONCAKE, key: value}, env={})
    assert cfg.notes == (f"`{key}: {str(value).lower()}` is what this connector always does; the key can go",)


@pytest.mark.parametrize(
    ("extra", "pointer"),
    [
        ({"consumer_is_to_load": False}, "leave this connector out"),
        ({"consumer_is_to_put": True}, 'kv_role "kv_both"'),
        ({"discard_partial_chunks": False}, "only full blocks"),
        ({"discard_partial_chunks": 1}, "only full blocks"),  # not the JSON boolean
        ({"lookup_rpc_port": "1", "memcache_rpc_port": "0"}, "keep `memcache_rpc_port`"),
    ],
)
def test_peer_key_we_do_not_honour_is_refused_with_a_pointer(extra, pointer):
    with pytest.raises(ConfigError, match=pointer) as err:
        parse_config({"backend": "mooncake", "mooncake": MOONCAKE, **extra}, env={})
    assert next(iter(extra)) in str(err.value)


def test_each_backend_names_itself_and_owns_keys_no_other_part_reads():
    from kvpool_connector.backends import BACKENDS, DEFAULT_BACKEND, backend_type

    assert DEFAULT_BACKEND in BACKENDS and PoolConfig().backend == DEFAULT_BACKEND
    owned = [key for name in BACKENDS for key in backend_type(name).config_keys]
    assert len(owned) == len(set(owned)) and not set(owned) & set(PoolConfig.__struct_fields__)
    assert [backend_type(name).name for name in BACKENDS] == list(BACKENDS)


@pytest.mark.parametrize(
    ("extra", "key", "owner"),
    [
        ({"backend": "mooncake", "mooncake": MOONCAKE, "memcache_device_id": 1}, "memcache_device_id", "memcache"),
        ({"mooncake": MOONCAKE}, "mooncake", "mooncake"),  # the default backend is memcache
    ],
)
def test_a_key_of_another_backend_is_refused_naming_its_backend(extra, key, owner):
    with pytest.raises(ConfigError, match=rf"`{key}` is a key of backend '{owner}'.*\"backend\": \"{owner}\""):
        parse_config(extra, env={})
