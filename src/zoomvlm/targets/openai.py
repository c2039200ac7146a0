"""Any OpenAI-compatible chat endpoint as a target: OpenAI (GPT-4.1-nano), vLLM, llama.cpp, Ollama.

Images travel as base64 JPEG data URLs (after shrinking each view to the budget), requests run with
bounded concurrency, and 429/5xx/connection errors are retried with exponential backoff (honouring
``Retry-After``). httpx is used directly rather than the ``openai`` SDK so that one small dependency
covers every server that speaks the protocol, including ones the SDK's extra validation rejects.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import os
import random
import time
from collections.abc import Sequence

import httpx
from PIL import Image

from zoomvlm.core.geometry import Budget
from zoomvlm.core.prompts import target_prompt
from zoomvlm.targets.base import Generation, TargetRequest, Usage

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAIAuthError(RuntimeError):
    """The endpoint refused the API key (HTTP 401/403)."""


class OpenAIRequestError(RuntimeError):
    """The endpoint rejected a request (4xx other than auth/429) or kept failing after all retries."""


def image_data_url(image: Image.Image, quality: int = 95) -> str:
    """``data:image/jpeg;base64,...`` for an RGB image (JPEG at ``quality``: text stays legible)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAITarget:
    """A chat-completions endpoint as a :class:`~zoomvlm.targets.base.Target`.

    Args:
        model: the model name the server expects (``gpt-4.1-nano``, a vLLM served name, ...).
        budget: default per-view budget applied before upload (GPT-4.1-nano reads ~512 px tiles).
        base_url: endpoint root ending in ``/v1``; default ``$OPENAI_BASE_URL`` or OpenAI's.
        api_key: default ``$OPENAI_API_KEY``; may be empty for local servers that need none.
        max_concurrency: requests in flight at once.
        max_retries: retries per request on 429, 5xx, timeouts and connection errors.
        backoff: first retry delay in seconds; doubles each retry (with jitter), capped at 30 s.
        max_tokens: generation limit; answers are "very brief" by prompt.
        detail: OpenAI's image ``detail`` (``low``/``high``/``auto``); None = omit (other servers).
        timeout: seconds per HTTP request attempt, to the whole answer (a server dripping bytes is cut off too).
        max_retry_after: the longest ``Retry-After`` honoured, seconds; a longer (or non-finite) one gives up at once
            rather than sleeping for it (the server's ``Upstream`` does the same).

    Raises:
        ValueError: ``max_concurrency < 1``, ``max_retries < 0`` or a timeout / backoff that is not a finite
            number (> 0 for ``timeout``). OpenAIAuthError: OpenAI's endpoint without a key.

    ``loglikelihood`` raises NotImplementedError: chat endpoints do not return prompt log-probabilities.
    """

    def __init__(
        self,
        model: str,
        budget: Budget | int | str | None = 512,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 8,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_tokens: int = 64,
        detail: str | None = None,
        timeout: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_retry_after: float = 60.0,
    ):
        self.model = model
        self.budget = Budget.parse(budget)
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not (math.isfinite(timeout) and timeout > 0) or not (math.isfinite(backoff) and backoff >= 0):
            raise ValueError(f"timeout must be a finite number > 0 and backoff >= 0, got {timeout}, {backoff}")
        self.max_retry_after = max_retry_after
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_tokens = max_tokens
        self.detail = detail
        self.timeout = timeout
        self.transport = transport
        self.name = f"openai:{model}@{self.budget}"
        if self.base_url == DEFAULT_BASE_URL and not self.api_key:
            raise OpenAIAuthError(
                "OPENAI_API_KEY is not set (needed for api.openai.com; set OPENAI_BASE_URL for a local server)"
            )

    def cache_identity(self) -> dict:
        """Settings that change the answers but not :attr:`name` (:func:`~zoomvlm.targets.cache.target_identity`):
        the endpoint (two servers may host models of one name), ``max_tokens`` and the image ``detail``."""
        return {"base_url": self.base_url, "max_tokens": self.max_tokens, "detail": self.detail}

    def _payload(self, views: list[Image.Image], question: str) -> dict:
        content: list[dict] = []
        for view in views:
            image_url = {"url": image_data_url(view)}
            if self.detail:
                image_url["detail"] = self.detail
            content.append({"type": "image_url", "image_url": image_url})
        content.append({"type": "text", "text": target_prompt(question)})
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }

    async def _post(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, payload: dict) -> tuple[dict, float]:
        async with sem:
            start = time.perf_counter()
            for attempt in range(self.max_retries + 1):
                try:  # httpx's timeout is per read: bound the whole attempt, or a dripping server never ends
                    response = await asyncio.wait_for(client.post("/chat/completions", json=payload), self.timeout)
                except asyncio.TimeoutError:
                    error, retry_after = f"no answer within {self.timeout:g} s", None
                    response = None
                except (httpx.TimeoutException, httpx.TransportError) as err:
                    error = f"{type(err).__name__}: {err}"
                    retry_after = None
                else:
                    if response.status_code in (401, 403):
                        raise OpenAIAuthError(
                            f"{self.base_url} refused the API key (HTTP {response.status_code}): {response.text[:200]}"
                            " -- check OPENAI_API_KEY"
                        )
                    if response.status_code == 429 or response.status_code >= 500:
                        error = f"HTTP {response.status_code}: {response.text[:200]}"
                        retry_after = response.headers.get("retry-after")
                    elif response.status_code >= 400:
                        raise OpenAIRequestError(
                            f"HTTP {response.status_code} from {self.base_url}: {response.text[:500]}"
                        )
                    else:
                        try:
                            return response.json(), time.perf_counter() - start
                        except ValueError as err:  # e.g. a gateway's HTML page with status 200
                            raise OpenAIRequestError(
                                f"{self.base_url} answered 200 with a body that is not JSON: {response.text[:200]!r}"
                            ) from err
                if attempt == self.max_retries:
                    break
                delay = min(30.0, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                if retry_after:
                    try:
                        wait = float(retry_after)
                    except ValueError:
                        wait = None
                    if wait is not None and (not math.isfinite(wait) or wait > self.max_retry_after):
                        raise OpenAIRequestError(
                            f"{self.base_url} asked to retry after {retry_after} s, over the "
                            f"{self.max_retry_after:g} s this target waits: {error}"
                        )
                    if wait is not None:
                        delay = max(delay, wait)
                logger.warning(
                    "%s (attempt %d/%d); retrying in %.1fs", error, attempt + 1, self.max_retries + 1, delay
                )
                await asyncio.sleep(delay)
            raise OpenAIRequestError(f"{self.base_url} failed after {self.max_retries + 1} attempts: {error}")

    async def _generate(self, payloads: list[dict]) -> list[tuple[dict, float]]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        sem = asyncio.Semaphore(self.max_concurrency)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=self.timeout, transport=self.transport
        ) as client:
            return await asyncio.gather(*(self._post(client, sem, p) for p in payloads))

    def generate(self, requests: Sequence[TargetRequest]) -> list[Generation]:
        """Send all requests concurrently (at most ``max_concurrency`` in flight); results in order.

        Raises:
            OpenAIAuthError: HTTP 401/403 (bad or missing key).
            OpenAIRequestError: another 4xx, a malformed response, or retries exhausted.
        """
        views = [r.views(self.budget) for r in requests]
        payloads = [self._payload(v, r.question) for v, r in zip(views, requests, strict=True)]
        start = time.perf_counter()
        results = asyncio.run(self._generate(payloads))
        # Usage.seconds is the batch's wall time split evenly, as for every target: with requests in flight
        # together, each one's own latency would count the overlap once per request
        seconds = (time.perf_counter() - start) / max(1, len(requests))
        out = []
        for (body, _latency), v in zip(results, views, strict=True):
            try:
                text = body["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError) as err:
                raise OpenAIRequestError(f"malformed response from {self.base_url}: {str(body)[:300]}") from err
            usage = body.get("usage") or {}
            out.append(
                Generation(
                    text.strip(),
                    Usage(
                        view_pixels=tuple(im.width * im.height for im in v),
                        prompt_tokens=usage.get("prompt_tokens"),
                        completion_tokens=usage.get("completion_tokens"),
                        seconds=seconds,
                    ),
                )
            )
        return out

    def chat(self, texts: Sequence[str], max_tokens: int | None = None) -> list[str]:
        """Text-only chat: each of ``texts`` as one user message, verbatim (no answer template), temperature 0.

        Used by LLM judges (e.g. AwaRes curation). Same concurrency, retries and errors as :meth:`generate`.
        """
        payloads = [
            {"model": self.model, "messages": [{"role": "user", "content": t}], "temperature": 0,
             "max_tokens": max_tokens or self.max_tokens}
            for t in texts
        ]  # fmt: skip
        out = []
        for body, _ in asyncio.run(self._generate(payloads)):
            try:
                out.append((body["choices"][0]["message"]["content"] or "").strip())
            except (KeyError, IndexError, TypeError) as err:
                raise OpenAIRequestError(f"malformed response from {self.base_url}: {str(body)[:300]}") from err
        return out

    def loglikelihood(self, requests: Sequence[TargetRequest]) -> list[float]:
        raise NotImplementedError(
            "OpenAI-compatible chat endpoints do not return prompt log-probabilities; "
            "use the accuracy reward, or an hf/ocr target for the likelihood reward"
        )
