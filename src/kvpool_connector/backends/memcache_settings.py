"""Backend "memcache"'s settings: its keys of ``kv_connector_extra_config``, its environment and its files.

pymmc reads memcache's ``key = value`` local-service file (named by ``memcache_config_path`` or
``MMC_LOCAL_CONFIG_PATH``) itself; it is read here first to check what would otherwise fail deep inside the first
client's ``init``: the meta service's address and the SSD tier's raw devices. Every mistake raises
:class:`ConfigError` naming the key or file.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from kvpool_connector.config import convert, read_text_file
from kvpool_connector.errors import ConfigError
from kvpool_connector.logs import init_logger

logger = init_logger(__name__)

MMC_LOCAL_CONFIG_ENV = "MMC_LOCAL_CONFIG_PATH"
MMC_STORAGE_ENABLED = "ock.mmc.local_service.storage.enabled"
UBSIO_DISK_PATH = "ubsio.disk.path"
UBSIO_MEM_SIZE = "ubsio.mem.size_in_gb"
UBSIO_DEVICE_COUNT = "ubsio.standalone.device_count"
UBSIO_MAX_DEVICE_COUNT = 16  # UBS IO's documented range for ubsio.standalone.device_count: 0 to 16
_MOUNTINFO = Path("/proc/self/mountinfo")
_SYS_DEV_BLOCK = Path("/sys/dev/block")


class MemcacheSettings(msgspec.Struct, frozen=True, kw_only=True):
    """memcache (pymmc) client settings: pymmc reads the local service file itself; we keep what we checked."""

    local_config_path: str
    meta_service_url: str
    device_id: int | None = None
    """Device this worker's memcache client binds (``memcache_device_id``); None: the worker's local rank."""
    ssd_devices: tuple[str, ...] = ()
    """The raw block devices of memcache's SSD tier (``ubsio.disk.path``); empty when the tier is off."""


class MemcacheKeys(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The keys of ``kv_connector_extra_config`` backend "memcache" reads."""

    memcache_config_path: str | None = None
    """A memcache local-service file to read instead of ``MMC_LOCAL_CONFIG_PATH``."""
    memcache_device_id: Annotated[int, msgspec.Meta(ge=0, le=1023)] | None = None
    """Device this worker's memcache client binds; unset: the worker's local rank."""


def read_mmc_local_config(path: str, source: str) -> dict[str, str]:
    """Parse memcache's ``key = value`` local-service file (comments with #)."""
    lines = read_text_file(path, source).splitlines()
    entries: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}={path!r} line {number}: expected 'key = value', got {line!r}")
        entries[key.strip()] = value.strip()
    return entries


def parse_memcache_settings(section: dict[str, Any], env: Mapping[str, str]) -> MemcacheSettings:
    """The settings from this backend's keys of ``kv_connector_extra_config`` (``section``) and the file they name."""
    keys = convert(section, MemcacheKeys, "kv_connector_extra_config")
    path = keys.memcache_config_path or env.get(MMC_LOCAL_CONFIG_ENV)
    source = "memcache_config_path" if keys.memcache_config_path else MMC_LOCAL_CONFIG_ENV
    if not path:
        raise ConfigError(
            f'backend "memcache" needs the memcache local service config: set {MMC_LOCAL_CONFIG_ENV} to its file '
            '(mmc-local.conf), or choose "backend": "mooncake"'
        )
    entries = read_mmc_local_config(path, source)
    url = entries.get("ock.mmc.meta_service_url", "")
    if not re.match(r"^tcp://[^:/]+:\d+$", url):
        raise ConfigError(
            f"{source}={path!r}: ock.mmc.meta_service_url must be tcp://host:port, got {url or 'nothing'!r}"
        )
    return MemcacheSettings(
        local_config_path=str(path),
        meta_service_url=url,
        device_id=keys.memcache_device_id,
        ssd_devices=_ssd_devices(entries, f"{source}={path!r}"),
    )


def _ssd_devices(entries: dict[str, str], where: str) -> tuple[str, ...]:
    """Check memcache's SSD tier (UBS IO) where the host can, before memcache starts: UBS IO takes whole raw block
    devices and refuses mounted ones, so a wrong path otherwise fails deep inside the first pool client's init."""
    enabled = entries.get(MMC_STORAGE_ENABLED, "false")
    if enabled.lower() not in ("true", "false"):
        raise ConfigError(f"{where}: {MMC_STORAGE_ENABLED} must be true or false, got {enabled!r}")
    if enabled.lower() == "false":
        return ()
    mem = entries.get(UBSIO_MEM_SIZE)  # unset: UBS IO's default
    if mem is not None and not (mem.isdigit() and int(mem) > 0):
        raise ConfigError(f"{where}: {UBSIO_MEM_SIZE} must be a whole number of GB, at least 1, got {mem!r}")
    count = entries.get(UBSIO_DEVICE_COUNT)
    if count is not None and not (count.isdigit() and int(count) <= UBSIO_MAX_DEVICE_COUNT):
        raise ConfigError(
            f"{where}: {UBSIO_DEVICE_COUNT} must be a whole number from 0 to {UBSIO_MAX_DEVICE_COUNT} (the memcache "
            f"local services on this host that give DRAM), got {count!r}"
        )
    paths = [p.strip() for p in entries.get(UBSIO_DISK_PATH, "").split(":")]
    if paths == [""]:
        raise ConfigError(
            f"{where}: {MMC_STORAGE_ENABLED} is true but {UBSIO_DISK_PATH} is not set; give the raw block devices "
            "of the SSD tier, colon-separated (e.g. /dev/nvme1n1:/dev/nvme2n1)"
        )
    mountinfo = _MOUNTINFO.read_text() if _MOUNTINFO.exists() else ""
    mounted = {fields[2] for fields in map(str.split, mountinfo.splitlines()) if len(fields) > 2}
    seen: dict[int, str] = {}
    for dev in paths:
        problem = _raw_device_problem(dev, mounted, seen)
        if problem:
            raise ConfigError(f"{where}: {UBSIO_DISK_PATH} entry {dev!r} {problem}; UBS IO needs raw disks of its own")
    logger.info("memcache SSD tier on (%s): %d raw device(s) %s", where, len(paths), ":".join(paths))
    return tuple(paths)


def _raw_device_problem(dev: str, mounted: set[str], seen: dict[int, str]) -> str | None:
    """Why ``dev`` cannot be a UBS IO device (None if it can); ``seen`` collects the devices already checked."""
    if not os.path.isabs(dev):
        return "is not an absolute path"
    try:
        st = os.stat(dev)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISBLK(st.st_mode):
        return "is not a block device"
    number = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if number in mounted:
        return f"is mounted (device {number} in {_MOUNTINFO})"
    if st.st_rdev in seen:
        return f"is the same device as {seen[st.st_rdev]!r}"
    seen[st.st_rdev] = dev
    sys_dir = _SYS_DEV_BLOCK / number
    if sys_dir.is_dir() and any((child / "partition").exists() for child in sys_dir.iterdir()):
        return "has partitions (give an unused partition, or a disk without any)"
    return None
