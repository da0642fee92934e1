"""The start-up check of memcache's SSD tier (UBS IO) in ``mmc-local.conf``: what the host can tell before memcache
runs (memcache itself needs Ascend and an unused raw disk, neither of which is here)."""

import logging
import os
import stat
from pathlib import Path

import pytest

from kvpool_connector.backends import memcache_settings
from kvpool_connector.config import ConfigError, parse_config

ASCEND_EXTRA = {"use_layerwise": False, "memcache_rpc_port": "0"}
META = "ock.mmc.meta_service_url = tcp://127.0.0.1:5000\nock.mmc.local_service.dram.size = 1GB\n"


def _parse(tmp_path: Path, ssd_lines: str):
    conf = tmp_path / "mmc-local.conf"
    conf.write_text(META + ssd_lines)
    return parse_config(ASCEND_EXTRA, env={"MMC_LOCAL_CONFIG_PATH": str(conf)})


def _mounted_block_device() -> str:
    """A block device mounted on this host (the root file system's disk, as a rule)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        source = line.split(" - ", 1)[1].split()[1]
        try:
            st = os.stat(source)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == line.split()[2]:
            return source
    raise AssertionError(
        "no block device is mounted on this host: the 'mounted' case needs one (the suite runs as root on a VM disk)"
    )


@pytest.fixture
def raw_device(tmp_path):
    """An unmounted block device node: loop major 7, a minor no loop device here uses."""
    node = tmp_path / "dev" / "ubsio0"
    node.parent.mkdir()
    try:
        os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    except PermissionError as exc:
        raise AssertionError("making a block device node needs root (CAP_MKNOD), as the suite runs") from exc
    return str(node)


@pytest.mark.parametrize(
    "ssd_lines",
    [
        "",
        "ock.mmc.local_service.storage.enabled = false\nubsio.disk.path = /no/such/disk\n",
        "# ock.mmc.local_service.storage.enabled = true\n# ubsio.disk.path =\n# ubsio.mem.size_in_gb = 10\n",
    ],
    ids=["absent", "false", "template-commented-out"],
)
def test_tier_off_checks_nothing(tmp_path, ssd_lines):
    cfg = _parse(tmp_path, ssd_lines)
    assert cfg.backend_settings.ssd_devices == ()


def test_enabled_must_be_true_or_false(tmp_path):
    with pytest.raises(ConfigError, match=r"mmc-local.conf.*ock.mmc.local_service.storage.enabled must be true or"):
        _parse(tmp_path, "ock.mmc.local_service.storage.enabled = yes\n")


@pytest.mark.parametrize("disk_line", ["", "ubsio.disk.path =\n"], ids=["absent", "empty"])
def test_enabled_without_disk_path(tmp_path, disk_line):
    with pytest.raises(ConfigError, match=r"mmc-local.conf.*storage.enabled is true but ubsio.disk.path is not set"):
        _parse(tmp_path, "ock.mmc.local_service.storage.enabled = true\n" + disk_line)


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nvme9n1"
    with pytest.raises(ConfigError, match=rf"ubsio.disk.path entry '{missing}' cannot be read \(No such file"):
        _parse(tmp_path, f"ock.mmc.local_service.storage.enabled = true\nubsio.disk.path = {missing}\n")


def test_relative_path(tmp_path):
    with pytest.raises(ConfigError, match=r"ubsio.disk.path entry 'dev/nvme0n1' is not an absolute path"):
        _parse(tmp_path, "ock.mmc.local_service.storage.enabled = true\nubsio.disk.path = dev/nvme0n1\n")


def test_regular_file_instead_of_block_device(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError, match=rf"ubsio.disk.path entry '{image}' is not a block device"):
        _parse(tmp_path, f"ock.mmc.local_service.storage.enabled = true\nubsio.disk.path = {image}\n")


def test_mounted_device(tmp_path, raw_device):
    mounted = _mounted_block_device()
    lines = f"ock.mmc.local_service.storage.enabled = true\nubsio.disk.path = {raw_device}:{mounted}\n"
    with pytest.raises(ConfigError, match=rf"ubsio.disk.path entry '{mounted}' is mounted \(device \d+:\d+ in "):
        _parse(tmp_path, lines)


def test_unmounted_raw_devices_are_accepted_and_logged(tmp_path, raw_device, caplog):
    second = str(Path(raw_device).with_name("ubsio1"))
    os.mknod(second, 0o600 | stat.S_IFBLK, os.makedev(7, 251))
    lines = (
        "ock.mmc.local_service.storage.enabled = true\n"
        f"ubsio.disk.path = {raw_device}:{second}\n"
        "ubsio.mem.size_in_gb = 10\n"
        "ubsio.standalone.device_count = 8\n"
    )
    with caplog.at_level(logging.INFO, logger="vllm.kvpool_connector.backends.memcache_settings"):
        cfg = _parse(tmp_path, lines)
    assert cfg.backend_settings.ssd_devices == (raw_device, second)
    tier_lines = [r.getMessage() for r in caplog.records if "SSD tier on" in r.getMessage()]
    assert len(tier_lines) == 1 and f"2 raw device(s) {raw_device}:{second}" in tier_lines[0]


def test_same_device_twice(tmp_path, raw_device):
    alias = Path(raw_device).with_name("alias")
    alias.symlink_to(raw_device)
    lines = f"ock.mmc.local_service.storage.enabled = true\nubsio.disk.path = {raw_device}:{alias}\n"
    with pytest.raises(ConfigError, match=rf"entry '{alias}' is the same device as '{raw_device}'"):
        _parse(tmp_path, lines)


def test_disk_with_partitions(tmp_path, raw_device, monkeypatch):
    # sysfs cannot be given a partition on demand: a tree of the same shape stands in for /sys/dev/block.
    sys_block = tmp_path / "sys-dev-block"
    (sys_block / "7:250" / "ubsio0p1").mkdir(parents=True)
    (sys_block / "7:250" / "ubsio0p1" / "partition").write_text("1\n")
    monkeypatch.setattr(memcache_settings, "_SYS_DEV_BLOCK", sys_block)
    with pytest.raises(ConfigError, match=rf"entry '{raw_device}' has partitions"):
        _parse(tmp_path, f"ock.mmc.local_service.storage.enabled = true\nubsio.disk.path = {raw_device}\n")


@pytest.mark.parametrize("value", ["0", "-5", "2.5", "10GB", ""])
def test_bad_memory_size(tmp_path, value):
    lines = (
        f"ock.mmc.local_service.storage.enabled = true\nubsio.disk.path = /dev/nvme1n1\nubsio.mem.size_in_gb = {value}"
    )
    with pytest.raises(
        ConfigError, match=rf"mmc-local.conf.*ubsio.mem.size_in_gb must be a whole number of GB.*'{value}'"
    ):
        _parse(tmp_path, lines)


@pytest.mark.parametrize("value", ["17", "-1", "eight"])
def test_bad_device_count(tmp_path, value):
    lines = (
        "ock.mmc.local_service.storage.enabled = true\nubsio.disk.path = /dev/nvme1n1\n"
        f"ubsio.standalone.device_count = {value}\n"
    )
    with pytest.raises(ConfigError, match=r"ubsio.standalone.device_count must be a whole number from 0 to 16"):
        _parse(tmp_path, lines)
