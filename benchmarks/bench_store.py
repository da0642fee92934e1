"""Pool data path and lookup benchmark: the connector's own worker and scheduler code against a real Mooncake Store.

Data path: a :class:`PoolWorker` (the object vLLM's worker process runs) registers KV-shaped CPU tensors and is
handed save and load plans, exactly as ``wait_for_save`` / ``start_load_kv`` hand them; save and load GB/s for
several page sizes and blocks per request, beside the memcpy ceiling for the same bytes. Loads across TP sizes
(GQA): the ranks of a TP 2 engine store, a TP 1 worker loads (two head-shard objects a block, re-assembled), and the
reverse (a TP 2 rank reads TP 1 objects and keeps its half), beside a same-TP load of the same blocks in the same run.

Lookup: a :class:`PoolScheduler` (built from a real VllmConfig, asking inline) answers ``get_num_new_matched_tokens``
for real vLLM ``Request`` objects of 1k to 32k tokens, all-hit and all-miss; p50/p99 latency.

Starts ``mooncake_master`` and a ``mooncake_client`` pool node on loopback unless ``--master host:port`` is given.
The worker contributes a segment of its own (a same-node pool, like a vLLM worker with the default
``global_segment_size``); ``--remote`` makes it contribute none, so every byte crosses TCP to the pool node;
``--shared-memory`` attaches it to the pool node through shared memory (``real_client_address``): the objects live in
another process on this host, as they do for a fresh engine's pool hit. The KV tensors are allocated the way vLLM's
CPU worker allocates them (one backing buffer, inside the connector's ``get_mem_pool_context``), so through shared
memory they sit in memory the node maps and transfers make one copy, as in the engine.

Run: ``python benchmarks/bench_store.py [--quick] [--out benchmarks/results]`` -> table, JSON and PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np
import plots
import torch
from common import warm_segment
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from kvpool_connector.config import parse_config
from kvpool_connector.keys import KVLayout, pool_key
from kvpool_connector.metadata import BlockTransfer, PoolConnectorMetadata
from kvpool_connector.worker import PoolWorker
from kvpool_testkit.inspection import wait_connected

LAYERS, BLOCK = 8, 128


def _layout(heads: int, dim: int) -> KVLayout:
    """TP 1, every KV head; the tensors below are laid out (blocks, heads, tokens, 2*dim): heads before tokens."""
    page = heads * BLOCK * 2 * dim * 4
    return KVLayout(
        "bench", "float32", "float32", "cpu", "LBHNC", "FullAttentionSpec", BLOCK, heads, dim, page, LAYERS, 1, 1
    )


def _memcpy_gbps(nbytes: int, repeat: int) -> float:
    src, dst = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeat))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_data_path(
    mooncake: dict, segment_bytes: int, page_kib: list[int], blocks: list[int], repeat: int, bar: tqdm
) -> list[dict]:
    """Rows of save and load GB/s; ``segment_bytes`` is the memory the objects land in (warmed once first)."""
    rows = []
    for kib in page_kib:
        heads, dim = 4, kib * 1024 // (4 * BLOCK * 2 * 4)  # 4 KV heads, fp32, K+V per token
        layout = _layout(heads, dim)
        num_blocks = max(blocks) * 2
        for mode in ("async", "sync"):
            extra = {
                "backend": "mooncake",
                "mooncake": mooncake,
                "async_save": mode == "async",
                "staging_buffer_mb": max(256, 2 * max(blocks) * LAYERS * kib // 1024),
            }
            cache_bytes = LAYERS * num_blocks * kib * 1024
            worker = PoolWorker(
                layout, f"bench{kib}{mode}", True, num_blocks, parse_config(extra, env={}), kv_cache_bytes=cache_bytes
            )
            placement = worker.kv_cache_allocation()  # vLLM asks for it (get_mem_pool_context), then allocates
            with placement or nullcontext():
                backing = torch.zeros(cache_bytes, dtype=torch.int8, device=torch.device("cpu"))
            backing.view(torch.float32).uniform_()
            per_layer = backing.view(torch.float32).view(LAYERS, num_blocks, heads, BLOCK, 2 * dim)
            caches = {f"model.layers.{i}.self_attn.attn": per_layer[i] for i in range(LAYERS)}
            load_mode = "zero-copy"
            if mooncake.get("real_client_address"):
                load_mode = "shm, one copy" if placement is not None and placement.served else "shm, via area"
            worker.register_kv_caches(caches)
            assert worker.pool is not None and wait_connected(worker.pool, 60), "Mooncake did not connect"
            warm_segment(worker.pool, worker.pages, segment_bytes, worker.shards[0])
            for n in blocks:
                nbytes = n * LAYERS * kib * 1024
                save_s, load_s = [], []
                for r in range(repeat):
                    hashes = [f"{mode}-{kib}-{n}-{r}-{i}".encode() for i in range(n)]
                    plan = PoolConnectorMetadata(saves=[BlockTransfer("req", list(range(n)), hashes)])
                    t0 = time.perf_counter()
                    worker.save(plan)
                    if worker.saver is not None:
                        assert worker.saver.drain(60)
                    save_s.append(time.perf_counter() - t0)
                    load = PoolConnectorMetadata(loads=[BlockTransfer("req", list(range(n, 2 * n)), hashes)])
                    load_s.append(_timed(lambda w=worker, plan=load: w.load(plan)))
                    assert not worker.take_load_errors(), "a load failed: the numbers would be fake"
                    # free the pool for the next sizes: a shared pool node would otherwise evict under them
                    # (hex keys: the common prefix of this repeat's hashes selects exactly its objects)
                    worker.pool.remove_shards([pool_key(worker.shards[0], f"{mode}-{kib}-{n}-{r}-".encode())])
                    bar.update(1)
                ceiling = _memcpy_gbps(nbytes, 3)
                measured = [("save", save_s)] + ([("load", load_s)] if mode == "async" else [])
                for op, times in measured:
                    gbps = nbytes / statistics.median(times) / 1e9
                    rows.append(
                        {
                            "op": op,
                            "mode": mode if op == "save" else load_mode,
                            "page KiB": kib,
                            "object KiB": LAYERS * kib,
                            "blocks": n,
                            "MiB": round(nbytes / 2**20, 1),
                            "GB/s": round(gbps, 2),
                            "memcpy GB/s": round(ceiling, 2),
                            "x memcpy": round(gbps / ceiling, 2),
                        }
                    )
            worker.shutdown()
            failed = {k: v for k, v in worker.stats.total().items() if k.startswith(("save_failed", "save_dropped"))}
            assert not failed, f"saves failed or were dropped: {failed}"
    return sorted(rows, key=lambda r: (r["op"] != "save", r["mode"] != "async", r["page KiB"], r["blocks"]))


def _worker(layout: KVLayout, rank: int, num_blocks: int, config) -> tuple[PoolWorker, torch.Tensor]:
    """A worker of TP rank ``rank`` with KV-shaped tensors of its heads, registered and connected, and those tensors
    (the worker keeps their addresses only, as vLLM keeps the KV cache: they must outlive it)."""
    from kvpool_connector.keys import fingerprint

    w = PoolWorker(layout, fingerprint(layout, rank, 0), True, num_blocks, config, ranks=(rank, 0))
    shape = (LAYERS, num_blocks, layout.num_kv_heads, BLOCK, 2 * layout.head_size)
    per_layer = torch.rand(shape)
    w.register_kv_caches({f"model.layers.{i}.self_attn.attn": per_layer[i] for i in range(LAYERS)})
    assert w.pool is not None and wait_connected(w.pool, 60), "Mooncake did not connect"
    return w, per_layer


def bench_cross_tp(mooncake: dict, page_kib: list[int], blocks: list[int], repeat: int, bar: tqdm) -> list[dict]:
    """Rows of load GB/s across TP sizes (bytes placed in the loading rank's pages), each beside a same-TP load of the
    same blocks into the same worker: TP 2 -> TP 1 (two objects a block), TP 1 -> TP 2 (half of one object a rank).
    Objects are put by other workers (pool clients) than the loading one, as an engine's hit reads another's."""
    from kvpool_connector import head_shards

    rows = []
    for kib in page_kib:
        heads, dim = 4, kib * 1024 // (4 * BLOCK * 2 * 4)
        tp1 = _layout(heads, dim)
        tp2 = head_shards.layout_at_tp(tp1, 2)
        num_blocks = max(blocks) * 2
        # 1 GB segments: three workers side by side (the objects land in any of them, or the pool node's)
        small = {**mooncake, "global_segment_size": "1 GB"} if mooncake.get("global_segment_size") else mooncake
        config = parse_config({"backend": "mooncake", "mooncake": small, "async_save": False}, env={})

        # Every load reads objects another worker (client) put, as an engine's hit reads another engine's.
        built = [_worker(tp1, 0, num_blocks, config), _worker(tp1, 0, num_blocks, config)]
        built += [_worker(tp2, rank, num_blocks, config) for rank in (0, 1)]
        one, other, *halves = (w for w, _ in built)
        cases = [
            ("TP 1 -> TP 1", [other], one, 1),
            ("TP 2 -> TP 1", halves, one, 2),
            ("TP 1 -> TP 2", [other], halves[0], 1),
        ]
        for n in blocks:
            for mode, savers, loader, stored_tp in cases:
                times = []
                for r in range(repeat + 1):  # the first, untimed, finds each worker's buffers allocated
                    hashes = [f"x{kib}-{n}-{r}-{mode}-{i}".encode() for i in range(n)]
                    for saver in savers:
                        saver.save(PoolConnectorMetadata(saves=[BlockTransfer("s", list(range(n)), hashes)]))
                    sources = [stored_tp] * n if stored_tp != loader.layout.tp_size else None
                    load = BlockTransfer("l", list(range(n, 2 * n)), hashes, sources=sources)
                    plan = PoolConnectorMetadata(loads=[load])
                    elapsed = _timed(lambda w=loader, plan=plan: w.load(plan))
                    times += [elapsed] if r else []
                    assert not loader.take_load_errors(), "a load failed: the numbers would be fake"
                    for saver in savers:
                        saver.pool.remove_shards([pool_key(saver.shards[0], f"x{kib}-{n}-{r}-".encode())])
                    bar.update(1 if r else 0)
                nbytes = n * loader.pages.block_bytes
                gbps = nbytes / statistics.median(times) / 1e9
                rows.append(
                    {
                        "mode": mode,
                        "page KiB": loader.layout.page_size_bytes // 1024,
                        "blocks": n,
                        "MiB placed": round(nbytes / 2**20, 1),
                        "GB/s": round(gbps, 2),
                    }
                )
            same = next(r for r in rows[::-1] if r["mode"] == "TP 1 -> TP 1")
            for row in rows[-2:]:
                row["x same-TP load"] = round(row["GB/s"] / same["GB/s"], 2)
            same["x same-TP load"] = 1.0
        for w, _ in built:
            w.shutdown()
    return rows


def bench_lookup(mooncake: dict, model_dir: str, lengths: list[int], repeat: int, bar: tqdm) -> list[dict]:
    from kvpool_connector import keys
    from kvpool_testkit.scheduler_side import Requests, pool_scheduler

    # the inline lookup's own latency (bench_async.py measures lookups off the scheduler loop)
    scheduler = pool_scheduler(model_dir, {"backend": "mooncake", "mooncake": mooncake, "lookup_async": False})
    assert scheduler.pool is not None and wait_connected(scheduler.pool, 60)
    requests = Requests()
    rng = np.random.default_rng(0)
    marker = np.zeros(64, dtype=np.uint8)
    scheduler.pool.register_memory(marker.ctypes.data, marker.nbytes)
    rows = []
    for n in lengths:
        for case in ("all-hit", "all-miss"):
            tokens = rng.integers(3, 2000, n).tolist()
            req = requests.make(f"{case}-{n}", tokens)
            if case == "all-hit":  # existence is all a lookup asks: store a small marker under every key
                wanted = [
                    keys.pool_key(s, h)
                    for h in keys.block_hashes(req.block_hashes, BLOCK, BLOCK, n // BLOCK)
                    for s in scheduler.shards
                ]
                outcomes = scheduler.pool.put(wanted, [[marker.ctypes.data]] * len(wanted), [[64]] * len(wanted))
                assert all(o.ok for o in outcomes), outcomes[:3]
            scheduler.get_num_new_matched_tokens(req, 0)  # warm-up: first use of this request's keys
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                extra_tokens, _ = scheduler.get_num_new_matched_tokens(req, 0)
                times.append((time.perf_counter() - t0) * 1e3)
                bar.update(1)
            expected = (n // BLOCK * BLOCK) - (1 if n % BLOCK == 0 else 0) if case == "all-hit" else 0
            assert extra_tokens == expected, (case, n, extra_tokens, expected)
            rows.append(
                {
                    "prompt tokens": n,
                    "case": case,
                    "keys": n // BLOCK * len(scheduler.shards),
                    "p50 ms": round(float(np.percentile(times, 50)), 3),
                    "p99 ms": round(float(np.percentile(times, 99)), 3),
                }
            )
    scheduler.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master", help="use a running mooncake_master (host:port) instead of starting one")
    parser.add_argument("--remote", action="store_true", help="the worker contributes no segment (all over TCP)")
    parser.add_argument(
        "--shared-memory", action="store_true", help="attach the worker to the pool node through shared memory"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="Mooncake replica_num: copies of each object (2: the worker's segment and the pool node's)",
    )
    parser.add_argument(
        "--parts",
        default="data,cross-tp,lookup",
        help="comma-separated: data (save/load), cross-tp (loads across TP sizes), lookup (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the benchmark runs")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.replicas > 1 and (args.remote or args.shared_memory):
        parser.error(
            "--replicas > 1 needs two segments: the worker's own and the pool node's (not --remote/--shared-memory)"
        )
    if args.shared_memory and (args.master or args.remote):
        parser.error("--shared-memory attaches to the pool node this benchmark starts: not with --master or --remote")
    page_kib, blocks, lengths = ([64, 256, 1024], [4, 16, 64], [1024, 4096, 16384, 32768])
    repeat = args.repeat
    if args.quick:
        page_kib, blocks, lengths, repeat = [64], [2], [1024], 2
    console = Console(width=130)
    args.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.master:
            master = args.master
        else:
            from kvpool_testkit.mooncake_pool import mooncake_pool

            pool = stack.enter_context(mooncake_pool(workdir / "mooncake", segment_size="4 GB"))
            master = pool.master_address
        mooncake = {
            "master_server_address": master,
            "local_hostname": "127.0.0.1",
            "protocol": "tcp",
            "global_segment_size": 0 if args.remote else "3 GB",
            "local_buffer_size": 0,
            "replica_num": args.replicas,
        }
        segment_bytes = 0 if args.remote else 3 << 30
        if args.shared_memory:
            mooncake = pool.client_config(shared_memory=True)
            segment_bytes = 4 << 30  # the pool node's
        from kvpool_testkit.tiny_model import build_model

        model = str(build_model(workdir / "tiny-llama"))
        total = len(page_kib) * 5 * len(blocks) * repeat + len(lengths) * 2 * max(repeat, 20)
        with tqdm(total=total, desc="bench_store", unit="op") as bar:
            parts = set(args.parts.split(","))
            data_rows = (
                bench_data_path(mooncake, segment_bytes, page_kib, blocks, repeat, bar) if "data" in parts else []
            )
            cross_rows = bench_cross_tp(mooncake, page_kib, blocks, repeat, bar) if "cross-tp" in parts else []
            lookup_rows = bench_lookup(mooncake, model, lengths, max(repeat, 20), bar) if "lookup" in parts else []
    for title, rows in (
        ("Data path: PoolWorker save/load on Mooncake Store", data_rows),
        ("Loads across TP sizes (GQA head shards): PoolWorker, synchronous loads", cross_rows),
        ("Lookup: PoolScheduler.get_num_new_matched_tokens", lookup_rows),
    ):
        if not rows:
            continue
        table = Table(title=title)
        for col in rows[0]:
            table.add_column(col, justify="right" if col not in ("op", "mode", "case") else "left")
        for r in rows:
            table.add_row(*(str(v) for v in r.values()))
        console.print(table)
    segment = "worker's own segment (same node)"
    if args.remote:
        segment = "remote (pool node over TCP)"
    elif args.shared_memory:
        segment = "pool node on this host, through shared memory"
    if args.replicas > 1:
        segment += f", {args.replicas} replicas (one on the pool node)"
    result = {
        "segment": segment,
        "data_path": data_rows,
        "cross_tp_load": cross_rows,
        "lookup": lookup_rows,
    }
    name = "bench_store" + ("_shm" if args.shared_memory else "") + (f"_r{args.replicas}" if args.replicas > 1 else "")
    parts = args.parts.split(",")
    name += "" if {"data", "cross-tp", "lookup"} <= set(parts) else "_" + "_".join(parts).replace("-", "_")
    name += "_quick" if args.quick else ""
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    if data_rows and lookup_rows:
        title = f"PoolWorker save/load ({segment}); PoolScheduler lookups\n{plots.run_label()}"
        plots.data_path(data_rows, lookup_rows, title, args.out / f"{name}.png")
    console.print(
        f"results: {args.out / (name + '.json')}"
        + (f", plot: {args.out / (name + '.png')}" if data_rows and lookup_rows else "")
    )


if __name__ == "__main__":
    main()
