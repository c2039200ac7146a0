"""The proxy's client for the upstream OpenAI-compatible endpoint: retries, timeouts, streaming.

Retries (bounded, exponential backoff with jitter, ``Retry-After`` honoured up to a cap) happen on
connection errors, 429 and 5xx, and only before the first byte reaches the client: a stream is retried
while its status line says 429/5xx, never once its body is being passed through. A timeout is not retried
(the upstream may still be working on the request): it becomes a 504. Client headers never reach the
upstream; its key is the server's own ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx

from zoomvlm.serve.errors import ServeError

logger = logging.getLogger(__name__)

__all__ = ["Upstream", "UpstreamReply"]

_RETRYABLE_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


@dataclass
class UpstreamReply:
    """An upstream answer: ``status`` and ``body`` bytes (non-streaming), or an open 200 ``stream``.

    Attributes:
        status: HTTP status from the upstream (2xx, or a 4xx passed through to the client).
        content_type: the upstream's ``content-type``.
        body: the whole body (non-streaming and error replies); ``None`` for an open stream.
        stream: an async iterator of raw body chunks (the SSE bytes as sent), for an open stream; the
            caller must exhaust it or call :meth:`aclose`.
        attempts: how many times the request was sent.
    """

    status: int
    content_type: str
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    attempts: int = 1
    _response: httpx.Response | None = None

    async def aclose(self) -> None:
        """Close the upstream connection of an open stream (also under cancellation)."""
        if self._response is not None:
            with anyio.CancelScope(shield=True):
                await self._response.aclose()


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None (absent, unparseable, or not a
    finite number: ``inf`` and ``nan`` parse as floats but are not delays)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Upstream:
    """One pooled HTTP client for ``base_url`` (ends in ``/v1``).

    Args:
        base_url: the upstream endpoint root, e.g. ``http://127.0.0.1:8001/v1``.
        api_key: sent as ``Authorization: Bearer``; empty = no header.
        timeout: seconds per attempt until the whole answer (non-streaming) or the response headers
            (streaming); also the longest silence between two streamed chunks.
        retries: retries after the first attempt.
        backoff: first retry delay in seconds, doubled per retry, with jitter in [0.5, 1] x.
        max_retry_after: a ``Retry-After`` longer than this ends the retries at once.
        on_retry: called once per retry (metrics).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.5,
        max_retry_after: float = 10.0,
        on_retry=None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_retry_after = max_retry_after
        self.on_retry = on_retry or (lambda: None)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            trust_env=False,  # never route through an environment proxy the operator did not name
            transport=transport,
        )

    async def aclose(self) -> None:
        """Close the pooled HTTP client (its connections); call once at server shutdown."""
        await self.client.aclose()

    async def get(self, path: str, timeout: float) -> httpx.Response:
        """One GET (no retries), e.g. ``/models`` for readiness. Raises httpx errors."""
        return await self.client.get(path, timeout=timeout)

    async def chat(self, payload: dict, stream: bool) -> UpstreamReply:
        """POST ``/chat/completions`` with retries (see the module docstring).

        Returns:
            A 2xx reply (with ``stream`` open when ``stream`` is True), or a 4xx reply to pass through.

        Raises:
            ServeError: 502 (upstream kept failing, or refused the server's key), 504 (timeout),
                429 (still rate limited after the retries; ``Retry-After`` passed on).
        """
        last_error = "no attempt"
        for attempt in range(self.retries + 1):
            retry_after = None
            request = self.client.build_request("POST", "/chat/completions", json=payload)
            try:
                response = await asyncio.wait_for(self.client.send(request, stream=True), self.timeout)
            except (asyncio.TimeoutError, httpx.TimeoutException) as err:
                raise ServeError(
                    504, f"upstream did not answer within {self.timeout:g} s", "upstream_timeout"
                ) from err
            except _RETRYABLE_ERRORS as err:
                last_error = f"{type(err).__name__}: {err}"
            else:
                status = response.status_code
                if status == 429 or status >= 500:
                    retry_after = _retry_after(response.headers.get("retry-after"))
                    last_error = f"HTTP {status}"
                    await response.aclose()
                    if attempt == self.retries or (retry_after or 0) > self.max_retry_after:
                        if status == 429:
                            headers = {"Retry-After": str(int(retry_after or 1))}
                            raise ServeError(
                                429, "upstream is rate limiting", "upstream_rate_limited", headers=headers
                            )
                        break
                elif status in (401, 403):
                    await response.aclose()
                    raise ServeError(502, f"upstream refused the server's API key (HTTP {status})", "upstream_auth")
                elif stream and status == 200:
                    return UpstreamReply(
                        status,
                        response.headers.get("content-type", "text/event-stream"),
                        stream=self._chunks(response),
                        attempts=attempt + 1,
                        _response=response,
                    )
                else:
                    try:
                        body = await asyncio.wait_for(response.aread(), self.timeout)
                    except (asyncio.TimeoutError, httpx.TimeoutException) as err:
                        raise ServeError(
                            504, f"upstream did not finish within {self.timeout:g} s", "upstream_timeout"
                        ) from err
                    except _RETRYABLE_ERRORS as err:
                        last_error = f"{type(err).__name__} while reading the answer: {err}"
                    else:
                        content_type = response.headers.get("content-type", "application/json")
                        return UpstreamReply(status, content_type, body=body, attempts=attempt + 1)
                    finally:
                        await response.aclose()
            if attempt == self.retries:
                break
            delay = self.backoff * 2**attempt * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = max(delay, retry_after)
            logger.warning(
                "upstream %s (attempt %d/%d); retrying in %.2f s", last_error, attempt + 1, self.retries + 1, delay
            )
            self.on_retry()
            await asyncio.sleep(delay)
        raise ServeError(502, f"upstream failed after {self.retries + 1} attempt(s): {last_error}", "upstream_error")

    async def _chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """Body chunks as they arrive, each within ``timeout`` of the previous one, DECODED: an upstream that
        gzips its stream (httpx asks for gzip) reaches the client as the plain event stream, since the reply we
        send carries no ``Content-Encoding``."""
        iterator = response.aiter_bytes().__aiter__()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(iterator.__anext__(), self.timeout)
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
