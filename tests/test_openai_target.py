"""The OpenAI-compatible target against a real HTTP server on 127.0.0.1 (a fake model behind it)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from zoomvlm.targets.base import TargetRequest
from zoomvlm.targets.openai import OpenAIAuthError, OpenAIRequestError, OpenAITarget


class FakeChatServer:
    """Answers chat completions with "saw N images WxH,..."; can fail the first K calls; tracks concurrency."""

    def __init__(self, fail_first: int = 0, status: int = 503, delay: float = 0.0, key: str = "sk-test"):
        self.fail_first, self.status, self.delay, self.key = fail_first, status, delay, key
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.calls += 1
                    call = server.calls
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.bodies.append(body)
                try:
                    time.sleep(server.delay)
                    if self.path != "/v1/chat/completions":
                        return self._reply(404, {"error": "not found"})
                    if self.headers.get("Authorization") != f"Bearer {server.key}":
                        return self._reply(401, {"error": {"message": "Incorrect API key provided"}})
                    if call <= server.fail_first:
                        return self._reply(server.status, {"error": "overloaded"})
                    sizes = []
                    for part in body["messages"][0]["content"]:
                        if part["type"] == "image_url":
                            url = part["image_url"]["url"]
                            assert url.startswith("data:image/jpeg;base64,")
                            img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                            sizes.append(f"{img.width}x{img.height}")
                    text = f"saw {len(sizes)} images {','.join(sizes)}"
                    self._reply(200, {"choices": [{"message": {"role": "assistant", "content": text}}],
                                      "usage": {"prompt_tokens": 100, "completion_tokens": 7}})  # fmt: skip
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _request(question="What is the total?"):
    return TargetRequest([Image.new("RGB", (1000, 2000), "white"), Image.new("RGB", (300, 100), "gray")], question)


def test_images_arrive_as_data_urls_resized_to_budget():
    with FakeChatServer() as server:
        target = OpenAITarget("fake-vlm", budget=512, base_url=server.url, api_key="sk-test")
        (gen,) = target.generate([_request()])
    assert gen.text == "saw 2 images 256x512,300x100"
    assert gen.usage.view_pixels == (256 * 512, 300 * 100)
    assert (gen.usage.prompt_tokens, gen.usage.completion_tokens) == (100, 7)
    body = server.bodies[0]
    assert body["model"] == "fake-vlm" and body["temperature"] == 0
    assert body["messages"][0]["content"][-1] == {
        "type": "text",
        "text": "What is the total?\nGive a very brief answer.",
    }


def test_retries_on_503_then_succeeds():
    with FakeChatServer(fail_first=2, status=503) as server:
        target = OpenAITarget("m", base_url=server.url, api_key="sk-test", backoff=0.01)
        (gen,) = target.generate([_request()])
    assert gen.text.startswith("saw 2 images") and server.calls == 3


def test_retries_on_429_and_gives_up_with_a_clear_error():
    with FakeChatServer(fail_first=100, status=429) as server:
        target = OpenAITarget("m", base_url=server.url, api_key="sk-test", backoff=0.01, max_retries=2)
        with pytest.raises(OpenAIRequestError, match="failed after 3 attempts: HTTP 429"):
            target.generate([_request()])
    assert server.calls == 3


def test_clean_error_on_401():
    with FakeChatServer() as server:
        target = OpenAITarget("m", base_url=server.url, api_key="wrong", backoff=0.01)
        with pytest.raises(OpenAIAuthError, match="refused the API key.*OPENAI_API_KEY"):
            target.generate([_request()])
    assert server.calls == 1  # auth errors are not retried


def test_concurrency_is_bounded_and_order_kept():
    with FakeChatServer(delay=0.1) as server:
        target = OpenAITarget("m", base_url=server.url, api_key="sk-test", max_concurrency=3)
        reqs = [TargetRequest([Image.new("RGB", (10 + i, 10))], f"q{i}") for i in range(9)]
        gens = target.generate(reqs)
    assert server.max_in_flight == 3
    assert [g.text for g in gens] == [f"saw 1 images {10 + i}x10" for i in range(9)]


def test_seconds_per_request_add_up_to_the_batch_not_to_the_sum_of_overlapping_latencies():
    with FakeChatServer(delay=0.2) as server:
        target = OpenAITarget("m", base_url=server.url, api_key="sk-test", max_concurrency=8)
        reqs = [TargetRequest([Image.new("RGB", (10, 10))], f"q{i}") for i in range(8)]
        start = time.perf_counter()
        gens = target.generate(reqs)
        wall = time.perf_counter() - start
    total = sum(g.usage.seconds for g in gens)
    assert server.max_in_flight > 1  # the requests overlapped, so their latencies sum to several walls
    assert 0.2 <= total <= wall  # the batch's wall time split evenly, as Usage.seconds is defined
    assert len({g.usage.seconds for g in gens}) == 1


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeChatServer() as server:
        (gen,) = OpenAITarget("m", base_url=server.url).generate([_request()])
    assert gen.text.startswith("saw")


def test_missing_key_for_openai_is_explained(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(OpenAIAuthError, match="OPENAI_API_KEY is not set"):
        OpenAITarget("gpt-4.1-nano")


def test_no_loglikelihood():
    with pytest.raises(NotImplementedError, match="accuracy reward"):
        OpenAITarget("m", base_url="http://127.0.0.1:9/v1").loglikelihood([_request()])


def test_hostile_or_broken_answers_end_in_clear_errors_not_hangs():
    """Retry-After inf / 3600 slept for ever / an hour; a 200 with an HTML body raised JSONDecodeError; a server
    dripping bytes was never cut off (httpx's timeout is per read); max_retries=-1 ended in UnboundLocalError."""
    import asyncio

    import httpx

    def target(handler, **kw):
        return OpenAITarget("m", base_url="http://up.test/v1", api_key="k", backoff=0.01,
                            transport=httpx.MockTransport(handler), **kw)  # fmt: skip

    for value in ("inf", "3600"):
        t = target(lambda r, v=value: httpx.Response(429, headers={"retry-after": v}), max_retries=3)
        start = time.perf_counter()
        with pytest.raises(OpenAIRequestError, match=f"asked to retry after {value} s"):
            t.generate([_request()])
        assert time.perf_counter() - start < 5
    with pytest.raises(OpenAIRequestError, match="200 with a body that is not JSON"):
        target(lambda r: httpx.Response(200, text="<html>gateway</html>")).generate([_request()])

    async def dripping(request):
        await asyncio.sleep(5)
        return httpx.Response(200, json={})

    start = time.perf_counter()
    with pytest.raises(OpenAIRequestError, match="no answer within 0.2 s"):
        target(dripping, timeout=0.2, max_retries=1).generate([_request()])
    assert time.perf_counter() - start < 3
    with pytest.raises(ValueError, match="max_retries must be >= 0"):
        target(lambda r: httpx.Response(200, json={}), max_retries=-1)
