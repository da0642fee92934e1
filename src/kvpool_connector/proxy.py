"""A router in front of vLLM instances that share a KV pool: one endpoint for an aggregated fleet, or for a
prefill/decode pair.

- Aggregated (``--instances``): each request goes, as it is, to one ``kv_both`` instance (round robin or least
  outstanding); the pool gives every instance every prefix, whichever served it first.
- Prefill/decode (``--prefill`` and ``--decode``): each request goes first to a prefill instance with
  ``max_tokens=1`` (its KV cache is computed there and saved to the pool / sent point to point), then to a decode
  instance with the ``kv_transfer_params`` prefill returned. A prompt the prefill instance already saved to the pool
  (``routing.HeldPrompts``) skips prefill and goes straight to a decode instance with that notice.

Answers (streaming or not) go back to the client as they come. ``X-Request-Id`` (generated when absent) and
``Authorization`` are forwarded. Upstream errors come back with their status and body; an unreachable upstream is a
502 with a message, never a hang or a traceback. ``/healthcheck`` shows each instance; ``/v1/models`` is the first
healthy instance's.

Needs fastapi, httpx and uvicorn (the ``proxy`` extra), not vLLM. Run:
``python -m kvpool_connector.proxy --instances http://127.0.0.1:8100 http://127.0.0.1:8200 --port 8000`` or
``python -m kvpool_connector.proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from kvpool_connector.handoff import SAVING_PARAM
from kvpool_connector.routing import HeldPrompts, Instance, InstanceGroup, Policy, prompt_identity

try:
    import httpx
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
except ImportError as exc:  # without the `proxy` extra the module still imports, so main() can name the extra
    _MISSING: ImportError | None = exc
else:
    _MISSING = None

INSTALL_HINT = "kvpool-proxy needs fastapi, httpx and uvicorn: pip install 'kvpool-connector[proxy]'"

logger = logging.getLogger("kvpool_connector.proxy")


@dataclass
class ProxyConfig:
    """``instances`` for an aggregated fleet, or ``prefill`` and ``decode`` for P/D (never both)."""

    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)
    policy: Policy = "round_robin"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    health_interval_s: float = 5.0
    held_prompts: int = 100_000  # prompts remembered as held by the pool (P/D prefill bypass); 0: always prefill
    held_prompt_max_age_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.instances and (self.prefill or self.decode):
            raise ValueError("give either --instances (aggregated) or --prefill and --decode (P/D), not both")
        if not self.instances and not (self.prefill and self.decode):
            raise ValueError("give --instances (aggregated) or both --prefill and --decode (P/D)")
        if self.policy not in ("round_robin", "least_outstanding"):
            raise ValueError(f"policy {self.policy!r}: use round_robin or least_outstanding")

    @property
    def disaggregated(self) -> bool:
        return not self.instances


class UpstreamError(Exception):
    """An upstream answer to hand back to the client as it is (status and body)."""

    def __init__(self, response: Response) -> None:
        self.response = response


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "proxy_error", "code": status}}, status_code=status)


def _forward_headers(request: Request, request_id: str) -> dict[str, str]:
    headers = {"X-Request-Id": request_id}
    if auth := request.headers.get("authorization"):
        headers["Authorization"] = auth
    return headers


def _prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    prefill = {k: v for k, v in body.items() if k != "stream_options"}
    prefill.update(stream=False, max_tokens=1)
    if "max_completion_tokens" in prefill:
        prefill["max_completion_tokens"] = 1
    prefill["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    return prefill


def _group(role: str, urls: list[str], policy: Policy) -> InstanceGroup:
    return InstanceGroup(role, [Instance(u.rstrip("/")) for u in urls], policy)


def create_app(config: ProxyConfig) -> FastAPI:
    if _MISSING is not None:
        raise ImportError(f"{INSTALL_HINT} ({_MISSING})") from _MISSING
    if config.disaggregated:
        groups = [_group("prefill", config.prefill, config.policy), _group("decode", config.decode, config.policy)]
    else:
        groups = [_group("instances", config.instances, config.policy)]
    prefill, answering = (groups[0], groups[1]) if config.disaggregated else (None, groups[0])
    held = HeldPrompts(config.held_prompts, config.held_prompt_max_age_s)
    counts = {"requests": 0, "prefill_skipped": 0}
    timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    every_instance = [i for g in groups for i in g.instances]

    async def watch_health(client: httpx.AsyncClient) -> None:
        while True:
            for instance in every_instance:
                try:
                    instance.healthy = (await client.get(f"{instance.url}/health", timeout=2.0)).status_code == 200
                except httpx.HTTPError:
                    instance.healthy = False
            await asyncio.sleep(config.health_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        watcher = asyncio.create_task(watch_health(app.state.client))
        logger.info("proxy: %s, %s", ", ".join(f"{len(g.instances)} {g.role}" for g in groups), config.policy)
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await app.state.client.aclose()

    app = FastAPI(lifespan=lifespan)

    async def run_prefill(client: httpx.AsyncClient, api: str, body: dict, headers: dict) -> dict[str, Any] | None:
        assert prefill is not None
        instance = prefill.pick()
        instance.outstanding += 1
        try:
            response = await client.post(f"{instance.url}/v1{api}", json=_prefill_body(body), headers=headers)
        except httpx.HTTPError as exc:
            instance.healthy = False
            raise UpstreamError(_error(502, f"prefill instance {instance.url} unreachable: {exc!r}")) from exc
        finally:
            instance.outstanding -= 1
        if response.status_code >= 400:
            raise UpstreamError(Response(response.content, response.status_code, media_type="application/json"))
        return response.json().get("kv_transfer_params")

    async def relay(client: httpx.AsyncClient, api: str, body: dict, headers: dict) -> Response:
        """The answer of one instance of the answering group (decode, or the aggregated fleet), as it comes."""
        instance = answering.pick()
        instance.outstanding += 1
        release = True
        try:
            upstream = await client.send(
                client.build_request("POST", f"{instance.url}/v1{api}", json=body, headers=headers), stream=True
            )
        except httpx.HTTPError as exc:
            instance.outstanding -= 1
            instance.healthy = False
            return _error(502, f"{answering.role} instance {instance.url} unreachable: {exc!r}")
        try:
            if upstream.status_code >= 400 or not body.get("stream"):
                content = await upstream.aread()
                media = upstream.headers.get("content-type", "application/json")
                return Response(content, upstream.status_code, media_type=media)

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                finally:
                    await upstream.aclose()
                    instance.outstanding -= 1

            release = False
            return StreamingResponse(
                chunks(), upstream.status_code, media_type=upstream.headers.get("content-type", "text/event-stream")
            )
        finally:
            if release:
                await upstream.aclose()
                instance.outstanding -= 1

    async def handle(api: str, request: Request) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return _error(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        counts["requests"] += 1
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        headers = _forward_headers(request, request_id)
        client: httpx.AsyncClient = request.app.state.client
        if prefill is None:
            return await relay(client, api, body, headers)
        identity = prompt_identity(api, body)
        if (notice := held.notice(identity)) is not None:
            counts["prefill_skipped"] += 1
            return await relay(client, api, {**body, "kv_transfer_params": {SAVING_PARAM: notice}}, headers)
        try:
            params = await run_prefill(client, api, body, headers)
        except UpstreamError as err:
            return err.response
        held.remember(identity, params)
        if params:
            body = {**body, "kv_transfer_params": params}
        return await relay(client, api, body, headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle("/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle("/chat/completions", request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        instance = next((i for i in answering.instances if i.healthy), answering.instances[0])
        try:
            upstream = await request.app.state.client.get(f"{instance.url}/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            return _error(502, f"{answering.role} instance {instance.url} unreachable: {exc!r}")
        return Response(upstream.content, upstream.status_code, media_type="application/json")

    @app.get("/healthcheck")
    async def healthcheck() -> JSONResponse:
        state: dict[str, Any] = {
            g.role: [{"url": i.url, "healthy": i.healthy, "outstanding": i.outstanding} for i in g.instances]
            for g in groups
        }
        ok = all(any(i.healthy for i in g.instances) for g in groups)
        state["counts"] = {**counts, "held_prompts": len(held)}
        return JSONResponse({"status": "ok" if ok else "degraded", **state}, status_code=200 if ok else 503)

    return app


def main() -> None:
    if _MISSING is not None:
        raise SystemExit(f"{INSTALL_HINT} (missing: {_MISSING.name})")
    parser = argparse.ArgumentParser(prog="kvpool-proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--instances", nargs="+", default=[], help="aggregated: kv_both instance URLs")
    parser.add_argument("--prefill", nargs="+", default=[], help="P/D: prefill instance URLs (http://host:port)")
    parser.add_argument("--decode", nargs="+", default=[], help="P/D: decode instance URLs (http://host:port)")
    parser.add_argument("--policy", choices=["round_robin", "least_outstanding"], default="round_robin")
    parser.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to an instance")
    parser.add_argument("--read-timeout", type=float, default=600.0, help="seconds an instance may stay silent")
    parser.add_argument("--health-interval", type=float, default=5.0, help="seconds between instance health checks")
    parser.add_argument(
        "--held-prompts",
        type=int,
        default=100_000,
        help="P/D: prompts the pool holds, remembered to skip their prefill (0: every request is prefilled)",
    )
    parser.add_argument("--held-prompt-max-age", type=float, default=3600.0, help="seconds one is remembered")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ProxyConfig(
            prefill=args.prefill,
            decode=args.decode,
            instances=args.instances,
            policy=args.policy,
            connect_timeout_s=args.connect_timeout,
            read_timeout_s=args.read_timeout,
            health_interval_s=args.health_interval,
            held_prompts=args.held_prompts,
            held_prompt_max_age_s=args.held_prompt_max_age,
        )
    except ValueError as exc:
        parser.error(str(exc))
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
