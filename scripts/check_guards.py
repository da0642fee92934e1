"""Revert each fix of a check that once could not fail (a mutation of the source), run the test that guards it, and
restore the source: every test must fail while its fix is reverted. ``python scripts/check_guards.py [NAME ...]``
(from the checkout, with the default environment); prints one line per mutation."""

import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
MUTATIONS = [
    (
        "keys: derivation changed",
        "src/kvpool_connector/keys.py",
        'KEY_FORMAT = "kvp1"',
        'KEY_FORMAT = "kvp2"',
        "tests/unit/test_keys.py::test_fingerprint_is_stable_text",
    ),
    (
        "StreamRuntime.bind_thread does nothing",
        "src/kvpool_connector/devices.py",
        "        self._torch.set_device(self.device_index)",
        "        return",
        "tests/unit/test_devices.py::test_connect_lookup_and_load_threads_set_the_workers_device",
    ),
    (
        "memcache registers host memory too",
        "src/kvpool_connector/backends/memcache.py",
        "        if not self._runtime.is_device_address(ptr):\n            return  # host memory",
        "        if False:\n            return  # host memory",
        "tests/unit/test_worker.py::test_only_the_kv_tensors_are_registered_with_memcache",
    ),
    (
        "memcache_device_id ignored",
        "src/kvpool_connector/backends/memcache.py",
        "        device = role.device_id if configured is None else configured",
        "        device = role.device_id",
        "tests/unit/test_worker.py::test_memcache_device_id_reaches_pymmcs_init_in_place_of_the_local_rank",
    ),
    (
        "a wrong-length reply read as unavailable",
        "src/kvpool_connector/backends/memcache.py",
        "                if len(codes) != len(chunk):\n                    continue",
        "                if len(codes) != len(chunk):\n                    codes = [CLIENT_NOT_INIT] * len(chunk)",
        "tests/unit/test_memcache_backend.py::test_a_reply_of_the_wrong_length_fails_every_key_and_opens_no_outage",
    ),
    (
        "sizes parsed as before",
        "src/kvpool_connector/config.py",
        'r"^\\s*(\\d+(?:\\.\\d+)?)\\s*((?:[kmgt]i?)?b?)\\s*$", re.IGNORECASE | re.ASCII',
        'r"^\\s*(\\d+(?:\\.\\d+)?)\\s*([kmgt]?i?b?)?\\s*$", re.IGNORECASE',
        "tests/unit/test_config_fuzz.py::test_a_size_means_what_it_says_or_is_refused_naming_the_key",
    ),
    (
        "bench_async's old call",
        "benchmarks/bench_async.py",
        "scheduler.request_finished(request)",
        "scheduler.request_finished(request, [])",
        "tests/e2e/test_benchmarks.py::test_bench_async_lookup_part_quick",
    ),
    (
        "a failed attempt's client left open",
        "src/kvpool_connector/pool.py",
        "                # would register the regions again.\n                _close_quietly(backend)",
        "                # would register the regions again.\n                pass",
        "tests/unit/test_pool.py::test_a_failed_attempt_closes_its_client_before_the_next_one "
        "tests/unit/test_memcache_backend.py::test_a_failed_connect_leaves_the_process_client_and_is_retried",
    ),
    (
        "Mooncake's refusal retried as an outage",
        "src/kvpool_connector/backends/mooncake.py",
        '            raise RegistrationRefused(\n                f"Mooncake refused',
        '            raise PoolUnavailable(\n                f"Mooncake refused',
        "tests/unit/test_mooncake_backend.py::test_memory_mooncake_refuses_is_a_start_up_error_not_an_endless_retry",
    ),
]


def main(names: list[str]) -> None:
    for name, path, old, new, tests in MUTATIONS:
        if names and name not in names:
            continue
        source = Path(ROOT) / path
        text = source.read_text()
        assert old in text, (name, old)
        source.write_text(text.replace(old, new, 1))
        try:
            command = [f"{ROOT}/.venv/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests.split()]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
            summary = [line for line in done.stdout.splitlines() if " passed" in line or " failed" in line][-1:]
            print(f"{'FAILS (good)' if done.returncode else 'PASSES (bad)'}: {name}: {summary}", flush=True)
        finally:
            source.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
