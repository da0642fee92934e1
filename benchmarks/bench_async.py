"""Loads and lookups off the critical path: what a pool hit costs the requests already running, and what a lookup
costs the scheduler step, with the connector's synchronous and asynchronous modes side by side.

1. ``itl``: decode inter-token latency of ``--streams`` running streams (OpenAI server, streaming, vLLM's own prefix
   cache off) while long-prompt pool hits arrive one after another, in fresh servers: no arrivals (the baseline),
   arrivals recomputed (no connector), and arrivals loaded from the pool synchronously (``load_async: false``: the
   forward pass waits for the load), asynchronously (``true``) or as ``auto`` (the default) picks per hit, over
   loopback TCP and through shared memory (``real_client_address``). ITL p50/p99 is taken over the window in which
   the hits arrive; each hit's own TTFT is its request's latency (``max_tokens`` 1).
   ``idle``: the same hits on an engine with nothing else running: their TTFT in each load mode.
2. ``lookup``: ``--arrivals`` requests of ``--hit-tokens`` tokens (half of them stored) arriving in one step at a
   real :class:`PoolScheduler` on a real Mooncake Store: the time ``get_num_new_matched_tokens`` adds to the step,
   asked inline (``lookup_async: false``) vs off the loop (the step that asks, and the step that collects the
   answers, a simulated 5-ms forward pass later).
3. ``pd``: 1P1D through the pool (producer, consumer, proxy): TTFT through the proxy (streaming, first token) with
   the producer saving synchronously (``async_save: false``) vs asynchronously, the consumer waiting for the
   producer's notice; then the same prompts again, prefilled, and with prefill skipped (the proxy knows the pool
   holds them).

Model: the ``bench`` preset (random-weight Llama, 16 KiB of fp32 KV per token: a 4,098-token hit is 64 MiB).

Run: ``python benchmarks/bench_async.py [--parts itl idle lookup pd] [--preset bench|tiny] [--out benchmarks/results]``
-> tables, ``bench_async.json`` and (``itl``) ``bench_async.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import plots
from rich.console import Console
from rich.table import Table

from kvpool_connector import keys
from kvpool_connector.processes import stop_process
from kvpool_testkit.client import server_metrics
from kvpool_testkit.engine import engine_env
from kvpool_testkit.inspection import wait_connected
from kvpool_testkit.mooncake_pool import PoolOnFreePorts, mooncake_pool
from kvpool_testkit.pd import pd_deployment, start_proxy
from kvpool_testkit.scheduler_side import BLOCK, Requests, pool_scheduler
from kvpool_testkit.server import vllm_server
from kvpool_testkit.tiny_model import PRESETS, build_model

SERVER_ARGS = ["--no-enable-prefix-caching", "--max-model-len", "8192", "--max-num-batched-tokens", "8192"]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "4"}


VOCAB = min(p.vocab_size for p in PRESETS.values())  # token ids every preset's model knows


PARTS = ("itl", "idle", "lookup", "pd")


def _prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(length)] for _ in range(count)]


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1e3, 1) if values else float("nan")


async def _stream(http: httpx.AsyncClient, url: str, model: str, prompt: list[int], times: list[float]) -> None:
    """Stream a long answer, appending every token's arrival time to ``times``, until cancelled."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4000, "temperature": 0.0, "stream": True}
    body["ignore_eos"] = True
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.monotonic())


async def _decode_with_arrivals(
    url: str, model: str, streams: list[list[int]], hits: list[list[int]], args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """ITLs of the streams inside the arrival window, and each arrival's latency (empty ``hits``: baseline). The
    streams are cancelled (the server aborts them) once the window is over."""
    token_times: list[list[float]] = [[] for _ in streams]
    async with httpx.AsyncClient(timeout=600) as http:
        decoding = [
            asyncio.create_task(_stream(http, url, model, p, t)) for p, t in zip(streams, token_times, strict=True)
        ]
        await asyncio.sleep(args.warmup_s)
        window_start = time.monotonic()
        latencies = []
        for prompt in hits:
            start = time.monotonic()
            body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
            (await http.post(f"{url}/v1/completions", json=body)).raise_for_status()
            latencies.append(time.monotonic() - start)
            await asyncio.sleep(max(0.0, args.gap_s - (time.monotonic() - start)))
        if not hits:
            await asyncio.sleep(args.gap_s * args.hits)
        window_end = time.monotonic()
        await asyncio.sleep(0.5)
        for task in decoding:
            task.cancel()
        await asyncio.gather(*decoding, return_exceptions=True)
    assert all(times and times[-1] > window_end for times in token_times), "a stream stopped inside the window"
    itls = [b - a for times in token_times for a, b in itertools.pairwise(times) if window_start <= b <= window_end]
    return itls, latencies


def _seed_pool(model: str, pool: PoolOnFreePorts, hits: list[list[int]], work: Path) -> None:
    """Store the arriving prompts' blocks once, from a server of their own."""
    env = engine_env(ENV)
    with vllm_server(model, work / "seed", pool.connector_config(), SERVER_ARGS, env=env) as s:
        for prompt in hits:
            body = {"model": model, "prompt": prompt, "max_tokens": 1}
            httpx.post(f"{s.url}/v1/completions", json=body, timeout=600).raise_for_status()
        deadline = time.monotonic() + 120
        want = len(hits) * (len(hits[0]) // BLOCK)
        while server_metrics(s.url).get("vllm:kvpool_saved_blocks_total", 0) < want:
            assert time.monotonic() < deadline, "the seed server's saves did not land"
            time.sleep(0.5)
            # counters of saves that land after the last step are reported with the next step: make one
            body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 1}
            httpx.post(f"{s.url}/v1/completions", json=body, timeout=600).raise_for_status()


LOAD_MODES = {"sync": False, "async": True, "auto": "auto"}
PLACES = {"TCP": False, "shm": True}


def _load_modes(pool: PoolOnFreePorts, args: argparse.Namespace) -> list[tuple[str, dict]]:
    return [
        (
            f"{mode} loads, {'TCP' if where == 'TCP' else 'shared memory'}",
            pool.connector_config(shared_memory=PLACES[where], load_async=LOAD_MODES[mode]),
        )
        for where in args.where
        for mode in args.load_modes
    ]


def bench_itl(model: str, work: Path, args: argparse.Namespace, console: Console, idle: bool = False) -> list[dict]:
    """Decode streams while hits arrive (``idle``: the hits alone, their TTFT on an engine with nothing else to do)."""
    hits = _prompts(args.hits, args.hit_tokens, seed=1)
    streams = [] if idle else _prompts(args.streams, 64, seed=2)
    rows = []
    with mooncake_pool(work / "mooncake", segment_size="4 GB") as pool:
        console.print("seeding the pool with the arriving prompts ...")
        _seed_pool(model, pool, hits, work)
        modes = [] if idle or not args.reference else [("no arrivals (baseline)", pool.connector_config(), [])]
        modes += [("arrivals recomputed (no connector)", None, hits)] if args.reference else []
        modes += [(label, config, hits) for label, config in _load_modes(pool, args)]
        for label, config, arrivals in modes:
            console.print(f"[bold]{label}[/] ...")
            env = engine_env(ENV)
            with vllm_server(model, work / label.replace(" ", "-"), config, SERVER_ARGS, env=env) as server:
                httpx.post(  # warm-up: the first request of a server pays one-off costs
                    f"{server.url}/v1/completions",
                    json={"model": model, "prompt": _prompts(1, 64, seed=3)[0], "max_tokens": 4},
                    timeout=600,
                ).raise_for_status()
                itls, latencies = asyncio.run(_decode_with_arrivals(server.url, model, streams, arrivals, args))
                hit_tokens = server_metrics(server.url).get("vllm:kvpool_hit_tokens_total", 0.0)
            row = {"mode": label, "arrival TTFT median ms": _pct(latencies, 50), "pool hit tokens": int(hit_tokens)}
            if not idle:
                row |= {
                    "ITL p50 ms": _pct(itls, 50),
                    "ITL p99 ms": _pct(itls, 99),
                    "ITL max ms": _pct(itls, 100),
                    "ITL samples": len(itls),
                }
            rows.append(row)
            console.print(f"  {rows[-1]}")
    return rows


def bench_lookup(model: str, work: Path, args: argparse.Namespace) -> list[dict]:
    requests = Requests()
    marker = np.zeros(64, dtype=np.uint8)
    rows = []
    with mooncake_pool(work / "mooncake-lookup", segment_size="256 MB") as pool:
        for mode, lookup_async in (("inline (lookup_async false)", False), ("off the loop (lookup_async true)", True)):
            config = {"backend": "mooncake", "mooncake": pool.client_config(), "lookup_async": lookup_async}
            scheduler = pool_scheduler(model, config)
            assert scheduler.pool is not None and wait_connected(scheduler.pool, 30)
            scheduler.pool.register_memory(marker.ctypes.data, marker.nbytes)
            ask_ms, collect_ms, steps = [], [], []
            for rep in range(args.lookup_reps + 1):  # the first repetition warms the connection up
                batch = [
                    requests.make(f"{mode}-{rep}-{i}", p)
                    for i, p in enumerate(_prompts(args.arrivals, args.hit_tokens, seed=1000 * rep + 7))
                ]
                for request in batch[::2]:
                    hashes = keys.block_hashes(request.block_hashes, BLOCK, BLOCK, args.hit_tokens // BLOCK)
                    wanted = [keys.pool_key(s, h) for h in hashes for s in scheduler.shards]
                    scheduler.pool.put(wanted, [[marker.ctypes.data]] * len(wanted), [[64]] * len(wanted))
                start = time.perf_counter()
                answers = [scheduler.get_num_new_matched_tokens(r, 0)[0] for r in batch]
                asked = time.perf_counter() - start
                step, collected = 1, 0.0
                while any(a is None for a in answers):
                    time.sleep(0.005)  # a forward pass
                    step += 1
                    start = time.perf_counter()
                    answers = [
                        scheduler.get_num_new_matched_tokens(r, 0)[0] if a is None else a
                        for r, a in zip(batch, answers, strict=True)
                    ]
                    collected = time.perf_counter() - start
                expected = args.hit_tokens // BLOCK * BLOCK - (1 if args.hit_tokens % BLOCK == 0 else 0)
                assert answers == [expected, 0] * (args.arrivals // 2), answers[:4]
                for request in batch:
                    scheduler.request_finished(request)
                if rep:
                    ask_ms.append(asked * 1e3)
                    collect_ms.append(collected * 1e3)
                    steps.append(step)
            scheduler.shutdown()
            rows.append(
                {
                    "lookups": mode,
                    "arrivals": args.arrivals,
                    "keys each": args.hit_tokens // BLOCK,
                    "step that asks, median ms": round(statistics.median(ask_ms), 2),
                    "step that collects, median ms": round(statistics.median(collect_ms), 2) if lookup_async else "-",
                    "steps until answered": statistics.median(steps),
                }
            )
    return rows


async def _ttft_via(url: str, model: str, prompt: list[int]) -> float:
    async with httpx.AsyncClient(timeout=600) as http:
        start = time.monotonic()
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "stream": True}
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return time.monotonic() - start
    raise AssertionError("no token streamed")


def bench_pd(model: str, work: Path, args: argparse.Namespace, console: Console) -> list[dict]:
    """New prompts through the proxy, the producer saving synchronously or asynchronously; then (asynchronous saves)
    the same prompts again, once through a proxy that prefills every request and once through the deployment's own,
    which remembers that the pool holds them and sends them straight to the consumer."""
    rows = []

    def row(label: str, ttfts: list[float], consumer_url: str) -> dict:
        metrics = server_metrics(consumer_url)
        rows.append(
            {
                "mode": label,
                "prompt tokens": args.hit_tokens,
                "TTFT median ms": _pct(ttfts, 50),
                "TTFT max ms": _pct(ttfts, 100),
                "consumer pool hit tokens (so far)": int(metrics.get("vllm:kvpool_hit_tokens_total", 0)),
                "consumer waits expired": int(metrics.get("vllm:kvpool_producer_wait_expired_total", 0)),
            }
        )
        console.print(f"  {rows[-1]}")
        return rows[-1]

    for label, async_save in (("producer saves synchronously", False), ("producer saves asynchronously", True)):
        console.print(f"[bold]1P1D, {label}[/] ...")
        prompts = _prompts(args.pd_reps, args.hit_tokens, seed=50 + async_save)
        with pd_deployment(
            model,
            work / f"pd-{async_save}",
            producer_config={"async_save": async_save},
            server_args=tuple(SERVER_ARGS[1:]),
            env_extra=ENV,
        ) as pd:
            asyncio.run(_ttft_via(pd.proxy_url, model, _prompts(1, 256, seed=99)[0]))  # warm-up
            first = [asyncio.run(_ttft_via(pd.proxy_url, model, p)) for p in prompts]
            row(f"new prompts, {label}", first, pd.consumer_url)
            if not async_save:
                continue
            proc, prefilling = start_proxy(
                work / f"pd-{async_save}", pd.producer_url, pd.consumer_url, "--held-prompts", "0"
            )
            try:
                repeat = [asyncio.run(_ttft_via(prefilling, model, p)) for p in prompts]
            finally:
                stop_process(proc)
            row("the same prompts again, prefilled", repeat, pd.consumer_url)
            repeat = [asyncio.run(_ttft_via(pd.proxy_url, model, p)) for p in prompts]
            row("the same prompts again, prefill skipped (the pool holds them)", repeat, pd.consumer_url)
    return rows


def _table(console: Console, title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--streams", type=int, default=8, help="running decode streams")
    parser.add_argument("--hits", type=int, default=6, help="long-prompt hits arriving during the decode")
    parser.add_argument("--hit-tokens", type=int, default=4098)
    parser.add_argument("--gap-s", type=float, default=1.0, help="from one arrival to the next")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="decode before the first arrival")
    parser.add_argument("--arrivals", type=int, default=64, help="requests arriving in one scheduler step")
    parser.add_argument("--lookup-reps", type=int, default=20)
    parser.add_argument("--load-modes", nargs="+", choices=list(LOAD_MODES), default=list(LOAD_MODES))
    parser.add_argument("--where", nargs="+", choices=list(PLACES), default=list(PLACES), help="itl, idle: transports")
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="itl, idle: skip the no-arrivals and no-connector rows",
    )
    parser.add_argument("--pd-reps", type=int, default=4)
    parser.add_argument("--preset", default="bench", choices=["bench", "tiny"], help="tiny: check the benchmark runs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    console = Console(width=150)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(build_model(work / args.preset, preset=args.preset))
        if "lookup" in args.parts:
            results["lookup"] = bench_lookup(model, work, args)
            _table(console, f"Scheduler step time, {args.arrivals} requests arriving at once", results["lookup"])
        if "itl" in args.parts:
            results["itl"] = bench_itl(model, work, args, console)
            _table(
                console,
                f"Decode ITL of {args.streams} streams while {args.hits} hits of {args.hit_tokens} tokens arrive",
                results["itl"],
            )
        if "idle" in args.parts:
            results["idle"] = bench_itl(model, work, args, console, idle=True)
            _table(console, f"TTFT of {args.hits} hits of {args.hit_tokens} tokens on an idle engine", results["idle"])
        if "pd" in args.parts:
            results["pd"] = bench_pd(model, work, args, console)
            _table(console, "1P1D TTFT through the proxy", results["pd"])
    out = args.out / "bench_async.json"
    out.write_text(json.dumps(results, indent=2))
    if results.get("itl"):
        title = (
            f"Pool hits arriving while {args.streams} streams decode, per load mode\n"
            f"{args.preset} Llama, fp32, {args.hits} hits of {args.hit_tokens} tokens; {plots.run_label()}"
        )
        plots.decode_under_hits(results["itl"], title, args.out / "bench_async.png")
    console.print(f"wrote {out}" + (f" and {args.out / 'bench_async.png'}" if results.get("itl") else ""))


if __name__ == "__main__":
    main()
