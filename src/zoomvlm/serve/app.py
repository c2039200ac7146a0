"""The zoom server's FastAPI app: ``POST /v1/chat/completions``, ``GET /v1/models``, health, readiness, metrics.

One request, in order (every refusal is an OpenAI-shaped error, before any model work where it can be):

1. auth (``ZOOMVLM_API_KEY``, constant-time compare; 401) and admission (a bounded queue; 503 + Retry-After);
2. the body, read under ``max_body_bytes`` (413), parsed and checked (400), its images decoded under the
   limits of :mod:`zoomvlm.serve.media` (400);
3. a processing slot (``max_concurrency``); then the policy, batched across clients, under
   ``policy_timeout`` (a failure forwards without crops and is counted, unless ``on_policy_error=fail``);
4. local mode: the target answers ``[global view, crops...]`` (batched); proxy mode: the views are
   encoded, the crops appended to the user's message, and the upstream answers (retries, timeouts,
   SSE passed through chunk by chunk).

A client that disconnects before its answer cancels the work in progress (the upstream call is
closed). Every answer carries ``x-zoomvlm-boxes`` (JSON: one list of ``[x0, y0, x1, y1]`` normalised
boxes per zoomed image), ``x-zoomvlm-rtr`` (pixels sent to the model / native pixels of the zoomed
images) and ``x-zoomvlm-policy-ms``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from zoomvlm.serve.batching import MicroBatcher
from zoomvlm.serve.chat import (
    ChatRequest,
    RequestImage,
    check_question,
    load_images,
    parse_chat_request,
    question_of,
    with_crops,
)
from zoomvlm.serve.config import ServeConfig
from zoomvlm.serve.errors import ServeError, error_body, error_response
from zoomvlm.serve.media import MediaLimits
from zoomvlm.serve.metrics import ServeMetrics
from zoomvlm.serve.upstream import Upstream, UpstreamReply

logger = logging.getLogger(__name__)

__all__ = ["ClientGone", "ZoomService", "create_app"]

_PROXY_DEFAULT_BUDGET = "512"
_V1_PATHS = ("/v1/chat/completions", "/v1/models")


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its work was cancelled."""


# ---------------------------------------------------------------------------------------------
# Admission: a bounded queue in front of a fixed number of processing slots
# ---------------------------------------------------------------------------------------------
class Admission:
    """At most ``concurrency`` requests processed and ``queue`` more waiting; beyond that, 503 at once."""

    def __init__(self, concurrency: int, queue: int, metrics: ServeMetrics):
        self._slots = asyncio.Semaphore(concurrency)
        self.capacity = concurrency + queue
        self.admitted = 0
        self.metrics = metrics

    def admit(self) -> None:
        """Count a new request in, or refuse it. Raises: ServeError 503 with ``Retry-After``."""
        if self.admitted >= self.capacity:
            raise ServeError(
                503,
                f"server is at capacity ({self.capacity} requests admitted); retry later",
                "overloaded",
                headers={"Retry-After": "1"},
            )
        self.admitted += 1

    async def acquire(self) -> None:
        """Wait for a processing slot (counted in ``zoomvlm_queue_depth`` while waiting)."""
        self.metrics.queue_depth.inc()
        try:
            await self._slots.acquire()
        finally:
            self.metrics.queue_depth.dec()
        self.metrics.in_flight.inc()

    def release(self, acquired: bool) -> None:
        """Count a request out (and free its slot if it got one)."""
        if acquired:
            self._slots.release()
            self.metrics.in_flight.dec()
        self.admitted -= 1


# ---------------------------------------------------------------------------------------------
# Auth + per-status counting, as plain ASGI (no body buffering, streaming untouched)
# ---------------------------------------------------------------------------------------------
class _Gate:
    def __init__(self, app, api_key: str | None, metrics: ServeMetrics):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.metrics = metrics

    def _authorized(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1"):
            return await self.app(scope, receive, send)
        status = [499]  # unless a response starts, the client went away first

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and not self._authorized(scope):
                body = error_body(401, "missing or invalid API key (Authorization: Bearer ...)", "invalid_api_key")
                response = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, counting_send)
            return await self.app(scope, receive, counting_send)
        except Exception:  # an unhandled error: the outer middleware answers 500, which this gate never sees sent
            if status[0] == 499:
                status[0] = 500
            raise
        finally:
            self.metrics.requests.labels(path if path in _V1_PATHS else "other", str(status[0])).inc()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past ``limit`` bytes, by Content-Length or while reading."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"request body of {declared} bytes is over the limit of {limit}", "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ServeError(413, f"request body is over the limit of {limit} bytes", "body_too_large")
    return bytes(body)


async def _read_body_within(request: Request, limit: int, timeout: float) -> bytes:
    """:func:`_read_body` in at most ``timeout`` seconds, else 408: a client that stalls mid-upload (one byte, then
    nothing) held its admission slot for ever, and enough of them made the server answer 503 to everyone."""
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError as err:
        raise ServeError(408, f"request body not received within {timeout:g} s", "body_timeout") from err


async def _race_disconnect(request: Request, work: Awaitable):
    """Run ``work``; if the client disconnects first, cancel it and raise :class:`ClientGone`.

    Must be called after the body was read: it listens on the ASGI ``receive`` channel, where the
    server reports ``http.disconnect`` when the connection closes.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone, nobody reads it
        pass
    raise ClientGone()


@dataclass
class _Zoom:
    """What zoom did for one request (goes to the response headers and the metrics)."""

    boxes: list[list[list[float]]] = field(default_factory=list)
    policy_seconds: float = 0.0
    fail_open: str | None = None
    rtr: float | None = None
    crops: int = 0
    crops_dropped: int = 0

    def headers(self) -> dict[str, str]:
        out = {
            "x-zoomvlm-boxes": json.dumps(self.boxes, separators=(",", ":")),
            "x-zoomvlm-policy-ms": f"{self.policy_seconds * 1000:.1f}",
        }
        if self.rtr is not None:
            out["x-zoomvlm-rtr"] = f"{self.rtr:.4f}"
        if self.fail_open:
            out["x-zoomvlm-fail-open"] = self.fail_open
        if self.crops_dropped:
            out["x-zoomvlm-crops-dropped"] = str(self.crops_dropped)
        return out


class _ReleasingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` once it is over, however it ends."""

    def __init__(self, *args, on_close, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------
class ZoomService:
    """The server's state: config, loaded policy/target or upstream client, batchers, metrics.

    Args:
        config: validated options (:class:`~zoomvlm.serve.config.ServeConfig`).
        policy: a loaded :class:`~zoomvlm.policies.ZoomPolicy`.
        target: a loaded :class:`~zoomvlm.targets.Target` (local mode), else None.
        api_key: required client key (``ZOOMVLM_API_KEY``); None = open.
        upstream_key: key sent to the upstream (``OPENAI_API_KEY``).
    """

    def __init__(self, config: ServeConfig, policy, target=None, api_key: str | None = None, upstream_key: str = ""):
        from zoomvlm.core.geometry import Budget

        self.config = config
        self.policy = policy
        self.target = target
        self.api_key = api_key
        self.metrics = ServeMetrics()
        self.admission = Admission(config.max_concurrency, config.max_queue, self.metrics)
        self.media = MediaLimits(
            config.max_image_bytes,
            config.max_image_pixels,
            config.allowed_domains,
            config.media_timeout,
            max_request_pixels=config.max_request_pixels,
        )
        self.crop_budget = Budget.parse(config.crop_budget) if config.crop_budget else None
        # Proxy mode only (local mode gives --budget to the target, which shrinks its views itself).
        self.global_budget = Budget.parse(config.budget or _PROXY_DEFAULT_BUDGET)
        if self.crop_budget is None and config.mode == "proxy":
            self.crop_budget = self.global_budget
        self.draining = False
        wait = config.batch_wait_ms / 1000
        batch_size = self.metrics.batch_size
        self.policy_batcher = MicroBatcher(self._propose, config.max_batch, wait, "zoomvlm-policy",
                                           on_batch=batch_size.labels("policy").observe)  # fmt: skip
        self.target_batcher = MicroBatcher(self._generate, config.max_batch, wait, "zoomvlm-target",
                                           on_batch=batch_size.labels("target").observe)  # fmt: skip
        self.upstream: Upstream | None = None
        if config.mode == "proxy":
            self.upstream = Upstream(
                config.upstream,
                upstream_key,
                config.upstream_timeout,
                config.upstream_retries,
                config.retry_backoff,
                config.max_retry_after,
                on_retry=self.metrics.retries.inc,
            )

    # ---- model calls (worker threads) ---------------------------------------------------------
    def _propose(self, items):
        return self.policy.propose([image for image, _ in items], [question for _, question in items])

    def _generate(self, requests):
        return self.target.generate(requests)

    # ---- stages -------------------------------------------------------------------------------
    async def zoom(self, images: list[RequestImage], question: str):
        """Proposals for the zoomed images, under the policy timeout; fail open (or 502) on failure."""
        from zoomvlm.policies import Proposal

        zoomed = [img for img in images if img.zoom]
        info = _Zoom()
        if not zoomed:
            return [], info
        start = time.perf_counter()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(self.policy_batcher.submit((img.image, question)) for img in zoomed)),
                self.config.policy_timeout,
            )
            proposals = [proposal for proposal, _ in results]
        except asyncio.TimeoutError:
            info.fail_open = "timeout"
        except Exception as err:  # noqa: BLE001 - any policy failure may fail open
            logger.warning("policy %s failed: %s: %s", self.policy.name, type(err).__name__, err)
            info.fail_open = "error"
        info.policy_seconds = time.perf_counter() - start
        self.metrics.policy_seconds.observe(info.policy_seconds)
        if info.fail_open:
            if self.config.on_policy_error == "fail":
                raise ServeError(502, f"zoom policy failed ({info.fail_open})", "policy_error")
            self.metrics.fail_open.labels(info.fail_open).inc()
            proposals = [Proposal() for _ in zoomed]
        info.boxes = [[b.as_list() for b in p.boxes] for p in proposals]
        return proposals, info

    def _local_rtr(self, zoomed: list[RequestImage], usage) -> tuple[float | None, str]:
        """``(rtr, unit)`` of a local answer, as ``zoomvlm eval`` counts it (:func:`~zoomvlm.core.pipeline.rtr_of`):
        the target's visual tokens over those of the zoomed images at native resolution where the target counts
        tokens (``hf:``: its processor tiles, squares or resizes, so pixels would mislead), else processed pixels
        over the images' native pixels."""
        count = getattr(self.target, "reference_visual_tokens", None)
        if count is not None and usage.visual_tokens is not None and zoomed:
            full = sum(count(img.image, None) or 0 for img in zoomed)
            if full:
                return usage.visual_tokens / full, "tokens"
        native = sum(img.image.width * img.image.height for img in zoomed)
        return (usage.pixels / native if native else None), "pixels"

    async def answer_local(self, typed: ChatRequest, images: list[RequestImage], question: str) -> Response:
        """Local mode: the target answers the last user message's images + crops."""
        from zoomvlm.core.pipeline import build_request
        from zoomvlm.targets import TargetRequest

        proposals, info = await self.zoom(images, question)
        zoomed = [img for img in images if img.zoom]
        views, budgets = [], []
        for img, proposal in zip(zoomed, proposals, strict=True):
            part = build_request(img.image, question, proposal, self.crop_budget)
            views.extend(part.images)
            budgets.extend(part.view_budgets or (None,) * len(part.images))
        request = TargetRequest(tuple(views), question, view_budgets=tuple(budgets) if views else None)
        try:
            # the seconds of the batched call that computed this answer: what the client waited for the target
            # (usage.seconds is that call split over the batch, as Usage defines it for throughput)
            generation, call_seconds = await asyncio.wait_for(
                self.target_batcher.submit(request), self.config.upstream_timeout
            )
        except asyncio.TimeoutError as err:
            raise ServeError(
                504, f"target did not answer within {self.config.upstream_timeout:g} s", "target_timeout"
            ) from err
        except ServeError:
            raise
        except Exception as err:
            logger.exception("target %s failed", self.target.name)
            raise ServeError(502, f"target failed: {type(err).__name__}", "target_error") from err
        usage = generation.usage
        self.metrics.upstream_seconds.observe(call_seconds)
        info.crops = sum(len(p.boxes) for p in proposals)
        # the reference's token count runs the processor: in the target's worker thread, off the event loop
        info.rtr, rtr_unit = await self.target_batcher.run_in_worker(self._local_rtr, zoomed, usage)
        self._observe(info)
        # "length" when the target's generation limit cut the answer (its completion filled max_new_tokens), as
        # OpenAI clients expect to detect truncation; targets without a limit or a token count say "stop"
        limit = getattr(self.target, "max_new_tokens", None)
        cut = limit is not None and usage.completion_tokens is not None and usage.completion_tokens >= limit
        finish = "length" if cut else "stop"
        created = int(time.time())
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        usage_json = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
        if None in usage_json.values():
            usage_json = None
        else:
            usage_json["total_tokens"] = usage.prompt_tokens + usage.completion_tokens
        zoom_json = {
            "boxes": info.boxes,
            "rtr": info.rtr,
            "view_pixels": list(usage.view_pixels),
            "rtr_unit": rtr_unit,
            "policy_ms": round(info.policy_seconds * 1000, 1),
            "target_ms": round(call_seconds * 1000, 1),
        }
        if not typed.stream:
            body = {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": typed.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": generation.text},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": usage_json,
                "zoomvlm": zoom_json,
            }
            return JSONResponse(body, headers=info.headers())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": typed.model}
        chunks = [
            _sse(
                base
                | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            ),
            _sse(base | {"choices": [{"index": 0, "delta": {"content": generation.text}, "finish_reason": None}]}),
            _sse(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}),
            b"data: [DONE]\n\n",
        ]
        return Response(b"".join(chunks), media_type="text/event-stream", headers=info.headers())

    async def prepare_proxy(self, raw: dict, images: list[RequestImage], question: str) -> tuple[dict, _Zoom]:
        """Proxy mode: the upstream payload (global views at the budget, crops appended) and what zoom did."""
        from zoomvlm.core.pipeline import build_request
        from zoomvlm.targets.openai import image_data_url

        proposals, info = await self.zoom(images, question)
        zoomed = [img for img in images if img.zoom]
        room = None
        if self.config.upstream_max_images is not None:
            room = max(0, self.config.upstream_max_images - len(images))

        def encode():
            global_urls, crop_urls, pixels = [], [], 0
            remaining = room
            for img in images:
                if not img.zoom:
                    global_urls.append(None)
                    crop_urls.append([])
                    continue
                proposal = proposals[zoomed.index(img)]
                views = build_request(img.image, question, proposal, self.crop_budget).views(self.global_budget)
                crops = views[1:]
                if remaining is not None:
                    info.crops_dropped += max(0, len(crops) - remaining)
                    crops = crops[:remaining]
                    remaining -= len(crops)
                unchanged = views[0].size == img.image.size
                global_urls.append(None if unchanged else image_data_url(views[0]))
                crop_urls.append([image_data_url(c) for c in crops])
                pixels += sum(v.width * v.height for v in [views[0], *crops])
            return global_urls, crop_urls, pixels

        global_urls, crop_urls, pixels = await asyncio.to_thread(encode)
        info.crops = sum(len(c) for c in crop_urls)
        native = sum(img.image.width * img.image.height for img in zoomed)
        info.rtr = pixels / native if native else None
        payload = with_crops(raw, images, global_urls, crop_urls, self.config.upstream_model)
        return payload, info

    def _observe(self, info: _Zoom) -> None:
        self.metrics.crops.observe(info.crops)
        if info.rtr is not None:
            self.metrics.rtr.observe(info.rtr)

    async def call_upstream(self, payload: dict, stream: bool) -> UpstreamReply:
        """Send the zoomed chat ``payload`` (OpenAI chat-completions JSON) upstream, with the retries of
        :meth:`~zoomvlm.serve.upstream.Upstream.chat`; the seconds it took go to the ``upstream_seconds`` histogram.

        Raises:
            ServeError: 502 / 504 / 429 as :meth:`~zoomvlm.serve.upstream.Upstream.chat` maps upstream failures.
        """
        start = time.perf_counter()
        try:
            return await self.upstream.chat(payload, stream)
        finally:
            self.metrics.upstream_seconds.observe(time.perf_counter() - start)


def create_app(service: ZoomService) -> FastAPI:
    """The FastAPI app around a :class:`ZoomService` (batchers start and stop with the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.policy_batcher.start()
        service.target_batcher.start()
        yield
        await service.policy_batcher.stop()
        await service.target_batcher.stop()
        if service.upstream is not None:
            await service.upstream.aclose()

    app = FastAPI(title="zoomvlm zoom server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    metrics = service.metrics
    config = service.config

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError):
        if err.status in (400, 413, 415, 503):  # refused by this server, before model work
            metrics.rejected.labels(err.code or str(err.status)).inc()
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse(error_body(err.status_code, str(err.detail)), err.status_code)

    @app.get("/health")
    async def health():
        """Alive (the process answers)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Ready: model loaded (local) or upstream reachable (proxy), and not draining."""
        if service.draining:
            return JSONResponse({"status": "draining"}, 503)
        if service.upstream is None:
            return {"status": "ready", "mode": "local"}
        try:
            response = await service.upstream.get("/models", timeout=2.0)
        except Exception as err:  # noqa: BLE001 - any failure means not reachable
            return JSONResponse({"status": "upstream unreachable", "error": type(err).__name__}, 503)
        if response.status_code >= 500:
            return JSONResponse({"status": "upstream unhealthy", "upstream_status": response.status_code}, 503)
        return {"status": "ready", "mode": "proxy"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        if service.upstream is None:
            entry = {"id": config.target, "object": "model", "created": 0, "owned_by": "zoomvlm"}
            return {"object": "list", "data": [entry]}
        try:
            response = await service.upstream.get("/models", timeout=config.upstream_timeout)
        except Exception as err:  # noqa: BLE001
            raise ServeError(502, f"upstream /models failed: {type(err).__name__}", "upstream_error") from err
        if response.status_code in (401, 403):  # the SERVER's key, as for chat: never the client's fault, and the
            # upstream's body (which may echo the server's masked key) is not passed on
            raise ServeError(502, f"the upstream refused the server's key ({response.status_code})", "upstream_auth")
        if response.status_code >= 500:
            raise ServeError(502, f"upstream /models answered {response.status_code}", "upstream_error")
        return Response(
            response.content, response.status_code, media_type=response.headers.get("content-type", "application/json")
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if service.draining:
            raise ServeError(503, "server is shutting down", "draining", headers={"Retry-After": "1"})
        service.admission.admit()
        acquired = handed_off = False
        try:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise ServeError(
                    415,
                    f"Content-Type must be application/json, got {content_type or 'none'!r}",
                    "unsupported_media_type",
                )
            try:
                body = await _read_body_within(request, config.max_body_bytes, config.body_timeout)
            except ClientDisconnect:  # gone mid-upload: not a server error
                logger.info("client disconnected while sending its request")
                return Response(status_code=499)
            raw, typed = parse_chat_request(body)
            question = question_of(typed)
            check_question(typed, question, local=service.upstream is None)

            async def work():
                nonlocal acquired
                await service.admission.acquire()
                acquired = True
                # decoded only once a processing slot is held: the queue holds compressed bodies, not pixels
                images = await load_images(typed, service.media, config.max_images)
                if service.upstream is None:
                    return await service.answer_local(typed, images, question), None, None
                payload, info = await service.prepare_proxy(raw, images, question)
                reply = await service.call_upstream(payload, typed.stream)
                service._observe(info)
                return None, reply, info

            try:
                response, reply, info = await _race_disconnect(request, work())
            except ClientGone:
                logger.info("client disconnected; its request was cancelled")
                return Response(status_code=499)
            if response is not None:
                return response
            if reply.stream is None:
                return Response(reply.body, reply.status, media_type=reply.content_type, headers=info.headers())

            async def passthrough():
                try:
                    async for chunk in reply.stream:
                        yield chunk
                except Exception as err:  # noqa: BLE001 - bytes already went out: end the stream with an error
                    logger.warning("upstream stream broke: %s: %s", type(err).__name__, err)
                    yield _sse(error_body(502, f"upstream stream broke: {type(err).__name__}", "upstream_error"))

            async def on_close():
                await reply.aclose()
                service.admission.release(acquired)

            handed_off = True
            return _ReleasingStream(
                passthrough(), media_type=reply.content_type, headers=info.headers(), on_close=on_close
            )
        finally:
            if not handed_off:
                service.admission.release(acquired)

    app.add_middleware(_Gate, api_key=service.api_key, metrics=metrics)
    return app
