"""Each guard test must catch the bug its fix removed: revert the fix (a mutation of the source), run the test, restore.

For every mutation, in order:
1. its text must be in the code: found outside comments and docstrings, exactly once. A mutation whose text is gone
   (the code moved on) is stale, and reported as an error, not skipped;
2. its tests run first on the unmodified tree (one pytest process for every selected mutation's tests) and must pass,
   so that a failure under the mutation is the mutation's doing;
3. the source is mutated, its tests run in one pytest process, and each named test itself must FAIL (read from
   pytest's per-test report, ``-rA``): a test that passes guards nothing, and an error (collection, a fixture, an id
   that names no test) says nothing about the guard, so both are errors;
4. the source is restored (in a ``finally``, whatever happened).

``python scripts/check_guards.py [NAME ...]`` from the checkout, with the interpreter of the environment under test
(``scripts/test.sh`` runs it in the vLLM 0.32 leg); one line per mutation, exit status 1 unless every guard held.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the checkout
    old: str  # code the fix wrote (must appear once outside comments and docstrings)
    new: str  # what it was before the fix
    tests: str  # space-separated pytest ids that must fail with ``new`` in place


MUTATIONS = [
    Mutation(
        "keys: derivation changed",
        "src/kvpool_connector/keys.py",
        'KEY_FORMAT = "kvp1"',
        'KEY_FORMAT = "kvp2"',
        "tests/unit/test_keys.py::test_fingerprint_is_stable_text",
    ),
    Mutation(
        "StreamRuntime.bind_thread does nothing",
        "src/kvpool_connector/devices.py",
        "        self._torch.set_device(self.device_index)",
        "        return",
        "tests/unit/test_devices.py::test_connect_lookup_and_load_threads_set_the_workers_device",
    ),
    Mutation(
        "memcache registers host memory too",
        "src/kvpool_connector/backends/memcache.py",
        "        if not self._runtime.is_device_address(ptr):\n            return  # host memory",
        "        if False:\n            return  # host memory",
        "tests/unit/test_worker.py::test_only_the_kv_tensors_are_registered_with_memcache",
    ),
    Mutation(
        "memcache_device_id ignored",
        "src/kvpool_connector/backends/memcache.py",
        "        device = role.device_id if configured is None else configured",
        "        device = role.device_id",
        "tests/unit/test_worker.py::test_memcache_device_id_reaches_pymmcs_init_in_place_of_the_local_rank",
    ),
    Mutation(
        "a wrong-length reply read as unavailable",
        "src/kvpool_connector/backends/memcache.py",
        "                if len(codes) != len(chunk):\n                    continue",
        "                if len(codes) != len(chunk):\n                    codes = [CLIENT_NOT_INIT] * len(chunk)",
        "tests/unit/test_memcache_backend.py::test_a_reply_of_the_wrong_length_fails_every_key_and_opens_no_outage",
    ),
    Mutation(
        "sizes parsed as before",
        "src/kvpool_connector/config.py",
        'r"^\\s*(\\d+(?:\\.\\d+)?)\\s*((?:[kmgt]i?)?b?)\\s*$", re.IGNORECASE | re.ASCII',
        'r"^\\s*(\\d+(?:\\.\\d+)?)\\s*([kmgt]?i?b?)?\\s*$", re.IGNORECASE',
        "tests/unit/test_config_fuzz.py::test_a_size_means_what_it_says_or_is_refused_naming_the_key",
    ),
    Mutation(
        "bench_async's old call",
        "benchmarks/bench_async.py",
        "scheduler.request_finished(request)",
        "scheduler.request_finished(request, [])",
        "tests/e2e/test_benchmarks.py::test_bench_async_lookup_part_quick",
    ),
    Mutation(
        "a failed attempt's client left open",
        "src/kvpool_connector/pool.py",
        "                # would register the regions again.\n                _close_quietly(backend)",
        "                # would register the regions again.\n                pass",
        "tests/unit/test_pool.py::test_a_failed_attempt_closes_its_client_before_the_next_one",
    ),
    Mutation(
        "Mooncake's refusal retried as an outage",
        "src/kvpool_connector/backends/mooncake.py",
        '            raise RegistrationRefused(\n                f"Mooncake refused',
        '            raise PoolUnavailable(\n                f"Mooncake refused',
        "tests/unit/test_mooncake_backend.py::test_memory_mooncake_refuses_is_a_start_up_error_not_an_endless_retry",
    ),
    Mutation(  # the device doubles judge transfer directions by their own record of device memory, not by this
        "is_device_address answers no",
        "src/kvpool_connector/devices.py",
        "            return i >= 0 and ptr < self._ends[i]",
        "            return False",
        "tests/unit/test_worker.py::test_staged_saves_put_host_memory_as_h2g_and_load_into_device_pages",
    ),
    Mutation(  # the cross-TP lookup test builds the stored shards' keys from vLLM's head assignment, not from this
        "a TP 2 page sized for every head",
        "src/kvpool_connector/head_shards.py",
        "        page_size_bytes=layout.page_size_bytes // layout.num_kv_heads * per_rank,",
        "        page_size_bytes=layout.page_size_bytes // layout.num_kv_heads * heads,",
        "tests/unit/test_scheduler.py::test_a_gqa_prefix_stored_at_another_tp_size_is_a_hit_loaded_from_there",
    ),
]


def not_code(text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` (Python source) that are comments or docstrings."""
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def offset(row: int, col: int) -> int:
        return starts[row - 1] + col

    spans: list[tuple[int, int]] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            spans.append((offset(*tok.start), offset(*tok.end)))
        elif tok.type == tokenize.STRING:
            before = tokens[i - 1].type if i else tokenize.NEWLINE
            after = tokens[i + 1].type if i + 1 < len(tokens) else tokenize.NEWLINE
            statement_start = before in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
            if statement_start and after in (tokenize.NEWLINE, tokenize.ENDMARKER):
                spans.append((offset(*tok.start), offset(*tok.end)))  # a string statement: a docstring
    return spans


def code_occurrences(text: str, old: str) -> list[int]:
    """Where ``old`` occurs with at least one of its non-blank characters in code."""
    spans = not_code(text)

    def in_code(start: int) -> bool:
        chars = [i for i in range(start, start + len(old)) if not text[i].isspace()]
        return any(not any(a <= i < b for a, b in spans) for i in chars)

    return [m.start() for m in re.finditer(re.escape(old), text) if in_code(m.start())]


_RESULT = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+)")


def run_tests(ids: list[str]) -> tuple[dict[str, str], str]:
    """Each id's outcome ("passed", "failed", "error" or "missing") and pytest's output. A parametrized test named
    without its parameters failed if any of its cases failed, passed if all passed. An id that names no test stops
    pytest before it runs any: it is dropped and the others run again."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *ids]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return dict.fromkeys(ids, "error"), f"timed out after {TIMEOUT_S} s"
    not_found = {
        line.split("not found: ", 1)[1].strip().removeprefix(f"{ROOT}/")
        for line in (done.stdout + done.stderr).splitlines()
        if line.startswith("ERROR: not found: ")
    }
    if not_found & set(ids):
        rest = [test_id for test_id in ids if test_id not in not_found]
        outcomes, output = run_tests(rest) if rest else ({}, "")
        return {**dict.fromkeys(not_found & set(ids), "missing"), **outcomes}, done.stdout + output
    results: list[tuple[str, str]] = []
    for line in done.stdout.splitlines():
        if m := _RESULT.match(line):
            results.append((m.group(2), m.group(1)))
    outcomes = {}
    for test_id in ids:
        seen = {status for node, status in results if node == test_id or node.startswith(test_id + "[")}
        if "FAILED" in seen:
            outcomes[test_id] = "failed"
        elif seen - {"PASSED"}:
            outcomes[test_id] = "error"  # an error, or an expected failure: neither is a guard's verdict
        elif seen:
            outcomes[test_id] = "passed"
        else:
            outcomes[test_id] = "missing"
    return outcomes, done.stdout + done.stderr


def tail(output: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in output.splitlines()[-lines:])


def main(names: list[str]) -> int:
    start = time.monotonic()
    unknown = set(names) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"ERROR: no mutation named {sorted(unknown)}")
        return 1
    selected = [m for m in MUTATIONS if not names or m.name in names]
    problems = 0

    def report(status: str, mutation: Mutation, detail: str) -> None:
        nonlocal problems
        problems += status != "ok"
        print(f"{status}: {mutation.name}: {detail}", flush=True)

    runnable = []
    for mutation in selected:
        text = (ROOT / mutation.path).read_text()
        found = code_occurrences(text, mutation.old)
        if not found:
            where = "only in comments or docstrings" if mutation.old in text else "nowhere"
            report("ERROR (stale)", mutation, f"its text is {where} in {mutation.path}: update or remove it")
        elif len(found) > 1:
            report("ERROR (ambiguous)", mutation, f"its text is in the code of {mutation.path} {len(found)} times")
        else:
            runnable.append((mutation, found[0]))

    ids = sorted({test for mutation, _ in runnable for test in mutation.tests.split()})
    began = time.monotonic()
    baseline, output = run_tests(ids) if ids else ({}, "")
    print(f"baseline: {len(ids)} guard tests on the unmodified tree ({time.monotonic() - began:.0f} s)", flush=True)
    for mutation, at in runnable:
        unwell = {t: baseline[t] for t in mutation.tests.split() if baseline[t] != "passed"}
        if unwell:
            report("ERROR (baseline)", mutation, f"on the unmodified tree: {unwell}\n{tail(output)}")
            continue
        source = ROOT / mutation.path
        text = source.read_text()
        source.write_text(text[:at] + mutation.new + text[at + len(mutation.old) :])
        began = time.monotonic()
        try:
            outcomes, output = run_tests(mutation.tests.split())
        finally:
            source.write_text(text)
        if all(outcome == "failed" for outcome in outcomes.values()):
            took = time.monotonic() - began
            report("ok", mutation, f"{len(outcomes)} test(s) fail with the fix reverted ({took:.0f} s)")
        elif "passed" in outcomes.values():
            report("BAD (guards nothing)", mutation, f"passes with the fix reverted: {outcomes}")
        else:
            report("ERROR (no verdict)", mutation, f"{outcomes}\n{tail(output)}")
    print(f"{len(selected) - problems} of {len(selected)} guards hold ({time.monotonic() - start:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
