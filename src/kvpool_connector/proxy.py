"""A prefill/decode proxy for disaggregated serving: prefill on one vLLM instance, then stream the answer from another.

Each ``/v1/completions`` or ``/v1/chat/completions`` request goes first to a prefill instance with ``max_tokens=1``
(its KV cache is computed there and saved to the pool / sent point to point), then to a decode instance with the
``kv_transfer_params`` prefill returned; the decode answer (streaming or not) goes back to the client as it comes.
``X-Request-Id`` (generated when absent) and ``Authorization`` are forwarded to both. Upstream errors come back with
their status and body; an unreachable upstream is a 502 with a message, never a hang or a traceback.

Needs fastapi, httpx and uvicorn, not vLLM. Run:
``python -m kvpool_connector.proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

logger = logging.getLogger("kvpool_connector.proxy")

Policy = Literal["round_robin", "least_outstanding"]


@dataclass
class ProxyConfig:
    prefill: list[str]
    decode: list[str]
    policy: Policy = "round_robin"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    health_interval_s: float = 5.0


@dataclass
class Backend:
    url: str
    outstanding: int = 0
    healthy: bool = True


@dataclass
class BackendGroup:
    """Instances of one role; picks one per request by the configured policy, preferring healthy ones."""

    role: str
    backends: list[Backend]
    policy: Policy
    _cycle: itertools.cycle = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cycle = itertools.cycle(range(len(self.backends)))

    def pick(self) -> Backend:
        candidates = [b for b in self.backends if b.healthy] or self.backends
        if self.policy == "least_outstanding":
            return min(candidates, key=lambda b: b.outstanding)
        while True:
            backend = self.backends[next(self._cycle)]
            if backend in candidates:
                return backend


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


def create_app(config: ProxyConfig) -> FastAPI:
    prefill = BackendGroup("prefill", [Backend(u.rstrip("/")) for u in config.prefill], config.policy)
    decode = BackendGroup("decode", [Backend(u.rstrip("/")) for u in config.decode], config.policy)
    timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)

    async def watch_health(client: httpx.AsyncClient) -> None:
        while True:
            for backend in prefill.backends + decode.backends:
                try:
                    backend.healthy = (await client.get(f"{backend.url}/health", timeout=2.0)).status_code == 200
                except httpx.HTTPError:
                    backend.healthy = False
            await asyncio.sleep(config.health_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        watcher = asyncio.create_task(watch_health(app.state.client))
        logger.info(
            "proxy: %d prefill, %d decode instances, %s", len(prefill.backends), len(decode.backends), config.policy
        )
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await app.state.client.aclose()

    app = FastAPI(lifespan=lifespan)

    async def run_prefill(client: httpx.AsyncClient, api: str, body: dict, headers: dict) -> dict[str, Any] | None:
        backend = prefill.pick()
        backend.outstanding += 1
        try:
            response = await client.post(f"{backend.url}/v1{api}", json=_prefill_body(body), headers=headers)
        except httpx.HTTPError as exc:
            backend.healthy = False
            raise UpstreamError(_error(502, f"prefill instance {backend.url} unreachable: {exc!r}")) from exc
        finally:
            backend.outstanding -= 1
        if response.status_code >= 400:
            raise UpstreamError(Response(response.content, response.status_code, media_type="application/json"))
        return response.json().get("kv_transfer_params")

    async def run_decode(client: httpx.AsyncClient, api: str, body: dict, headers: dict) -> Response:
        backend = decode.pick()
        backend.outstanding += 1
        release = True
        try:
            upstream = await client.send(
                client.build_request("POST", f"{backend.url}/v1{api}", json=body, headers=headers), stream=True
            )
        except httpx.HTTPError as exc:
            backend.outstanding -= 1
            backend.healthy = False
            return _error(502, f"decode instance {backend.url} unreachable: {exc!r}")
        try:
            if upstream.status_code >= 400 or not body.get("stream"):
                content = await upstream.aread()
                media = upstream.headers.get("content-type", "application/json")
                return Response(content, upstream.status_code, media_type=media)

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
                finally:
                    await upstream.aclose()
                    backend.outstanding -= 1

            release = False
            return StreamingResponse(
                relay(), upstream.status_code, media_type=upstream.headers.get("content-type", "text/event-stream")
            )
        finally:
            if release:
                await upstream.aclose()
                backend.outstanding -= 1

    async def handle(api: str, request: Request) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return _error(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        headers = _forward_headers(request, request_id)
        client: httpx.AsyncClient = request.app.state.client
        try:
            params = await run_prefill(client, api, body, headers)
        except UpstreamError as err:
            return err.response
        if params:
            body = {**body, "kv_transfer_params": params}
        return await run_decode(client, api, body, headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle("/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle("/chat/completions", request)

    @app.get("/healthcheck")
    async def healthcheck() -> JSONResponse:
        state = {
            group.role: [{"url": b.url, "healthy": b.healthy, "outstanding": b.outstanding} for b in group.backends]
            for group in (prefill, decode)
        }
        ok = all(any(b.healthy for b in g.backends) for g in (prefill, decode))
        return JSONResponse({"status": "ok" if ok else "degraded", **state}, status_code=200 if ok else 503)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", nargs="+", required=True, help="prefill instance URLs (http://host:port)")
    parser.add_argument("--decode", nargs="+", required=True, help="decode instance URLs (http://host:port)")
    parser.add_argument("--policy", choices=["round_robin", "least_outstanding"], default="round_robin")
    parser.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to an instance")
    parser.add_argument("--read-timeout", type=float, default=600.0, help="seconds an instance may stay silent")
    parser.add_argument("--health-interval", type=float, default=5.0, help="seconds between instance health checks")
    args = parser.parse_args()
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ProxyConfig(
        args.prefill, args.decode, args.policy, args.connect_timeout, args.read_timeout, args.health_interval
    )
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
