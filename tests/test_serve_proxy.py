"""The zoom server in proxy mode, as real processes on 127.0.0.1: a scriptable fake upstream (tests/serve_fakes.py)
behind ``zoomvlm serve --upstream``; the official ``openai`` client and raw httpx as clients.

Covers: crops reach the upstream, headers and keys, faults (retries, 502, 504, reset mid-stream, client
disconnect), hostile input (refused before the upstream sees anything), load (64 concurrent, no mix-ups),
streaming order, the bounded queue, fail-open, and draining on SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import statistics
import struct
import threading
import time
import zlib

import httpx
import openai
import pytest
from PIL import Image
from serve_fakes import start_fake_upstream, start_server, stop

KEY = "sk-zoom-test"
UPSTREAM_KEY = "sk-upstream-secret"


def png_url(width: int, height: int, color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(text: str, *urls: str, stream: bool = False, model: str = "client-model") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return {"model": model, "messages": [{"role": "user", "content": parts}], "stream": stream}


@pytest.fixture(scope="module")
def upstream():
    proc, url = start_fake_upstream()
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def proxy(upstream):
    """The main proxy: center crop policy, auth on, small timeouts so faults are quick."""
    args = [
        "--upstream",
        upstream,
        "--upstream-model",
        "fake-model",
        "--policy",
        "center",
        "--upstream-timeout",
        "2",
        "--upstream-retries",
        "2",
        "--retry-backoff",
        "0.05",
        "--upstream-max-images",
        "3",
        "--allowed-media-domains",
        "localhost",
    ]
    proc, url = start_server(args, env={"ZOOMVLM_API_KEY": KEY, "OPENAI_API_KEY": UPSTREAM_KEY})
    yield url
    stop(proc)


@pytest.fixture()
def fake(upstream):
    """The fake upstream's control: reset before each test; ``fake.script([...])``, ``fake.log()``."""
    root = upstream.removesuffix("/v1")

    class Control:
        def script(self, items):
            httpx.post(f"{root}/control", json={"script": items}).raise_for_status()

        def log(self):
            return httpx.get(f"{root}/log").json()

        def chats(self):
            return [e for e in self.log() if "event" not in e]

    httpx.post(f"{root}/reset").raise_for_status()
    return Control()


def post(url: str, body, key: str | None = KEY, timeout: float = 30.0, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    if isinstance(body, (bytes, str)):
        return httpx.post(
            f"{url}/chat/completions",
            content=body,
            headers=headers | {"content-type": headers.get("content-type", "application/json")},
            timeout=timeout,
        )
    return httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=timeout)


def metric(url: str, name: str) -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# ---------------------------------------------------------------------------------------------
# end to end through the official client
# ---------------------------------------------------------------------------------------------
def test_openai_client_gets_answer_and_upstream_gets_crop(proxy, fake):
    client = openai.OpenAI(base_url=proxy, api_key=KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="client-model", messages=chat("what is red?", png_url(400, 300))["messages"]
    )
    answer = raw.parse().choices[0].message.content
    # center crop of 400x300 = 200x150, appended after the user's own image (unchanged: it fits 512 px)
    assert answer == "echo:what is red?|images=2|sizes=400x300,200x150"
    assert json.loads(raw.headers["x-zoomvlm-boxes"]) == [[[0.25, 0.25, 0.75, 0.75]]]
    assert float(raw.headers["x-zoomvlm-rtr"]) == pytest.approx(1.25)
    assert float(raw.headers["x-zoomvlm-policy-ms"]) >= 0
    (sent,) = fake.chats()
    assert sent["model"] == "fake-model"  # --upstream-model replaces the client's
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the server's key, not the client's
    assert KEY not in json.dumps(sent["headers"])


def test_client_headers_not_forwarded_and_big_image_shrunk(proxy, fake):
    r = post(proxy, chat("q", png_url(2000, 1000)), headers={"x-secret": "s3cret", "cookie": "a=b"})
    assert r.status_code == 200
    sent = fake.chats()[0]
    assert "x-secret" not in sent["headers"] and "cookie" not in sent["headers"]
    # global view shrunk to the 512 px budget, crop (1000x500 of the ORIGINAL) shrunk to 512 px too
    assert sent["sizes"] == ["512x256", "512x256"]
    assert float(r.headers["x-zoomvlm-rtr"]) == pytest.approx(2 * 512 * 256 / 2_000_000, rel=1e-3)


def test_streaming_passes_chunks_in_order(proxy, fake):
    client = openai.OpenAI(base_url=proxy, api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="m", messages=chat("count", png_url(64, 64))["messages"], stream=True
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 10
    assert "".join(pieces) == "echo:count|images=2|sizes=64x64,32x32"
    assert fake.chats()[0]["stream"] is True


def test_upstream_image_limit_drops_crops(proxy, fake):
    r = post(proxy, chat("two", png_url(64, 64), png_url(80, 80)))
    assert r.status_code == 200
    assert fake.chats()[0]["sizes"] == ["64x64", "80x80", "32x32"]  # 3 images at most upstream
    assert r.headers["x-zoomvlm-crops-dropped"] == "1"


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------
def test_retries_500_then_503_with_retry_after(proxy, fake):
    fake.script([{"status": 500}, {"status": 503, "retry_after": "1"}])
    before = metric(proxy, "zoomvlm_upstream_retries_total")
    start = time.monotonic()
    r = post(proxy, chat("retry me", png_url(64, 64)))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("echo:retry me")
    assert time.monotonic() - start >= 1.0  # Retry-After: 1 honoured
    assert len(fake.chats()) == 3
    assert metric(proxy, "zoomvlm_upstream_retries_total") - before == 2


def test_always_500_gives_clean_502_after_n_tries(proxy, fake):
    fake.script([{"status": 500}] * 10)
    client = openai.OpenAI(base_url=proxy, api_key=KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=chat("x", png_url(64, 64))["messages"])
    assert info.value.status_code == 502
    assert info.value.body["type"] == "upstream_error" and "3 attempt" in info.value.body["message"]
    assert len(fake.chats()) == 3  # 1 + --upstream-retries 2


@pytest.mark.parametrize(
    "script, status, code, attempts",
    [
        ([{"status": 400}], 400, None, 1),  # the upstream's own 4xx passes through, not retried
        ([{"status": 401}], 502, "upstream_auth", 1),  # the server's key is wrong, not the client's
        ([{"status": 429, "retry_after": "0"}] * 3, 429, "upstream_rate_limited", 3),
    ],
    ids=["400-passthrough", "401-is-502", "429-exhausted"],
)
def test_upstream_status_mapping(proxy, fake, script, status, code, attempts):
    fake.script(script)
    r = post(proxy, chat("x", png_url(32, 32)))
    assert r.status_code == status
    if code:
        assert r.json()["error"]["code"] == code
    else:
        assert r.json() == {"error": {"message": "scripted failure"}}  # the upstream's body, as sent
    if status == 429:
        assert r.headers["retry-after"]
    assert len(fake.chats()) == attempts


def test_slow_upstream_gives_504_at_the_timeout(proxy, fake):
    fake.script([{"sleep": 8}])
    start = time.monotonic()
    r = post(proxy, chat("slow", png_url(64, 64)))
    elapsed = time.monotonic() - start
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert 1.9 <= elapsed < 6
    assert len(fake.chats()) == 1  # a timeout is not retried


def test_connection_reset_mid_stream_is_not_retried(proxy, fake):
    fake.script([{"reset_after_chunks": 3}])
    client = openai.OpenAI(base_url=proxy, api_key=KEY, max_retries=0)
    pieces = []
    with pytest.raises(openai.APIError, match="upstream stream broke"):
        for chunk in client.chat.completions.create(
            model="m", messages=chat("reset", png_url(64, 64))["messages"], stream=True
        ):
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) == 3  # what was streamed before the reset arrived, in order
    assert len(fake.chats()) == 1  # bytes had reached the client: no retry


# ---------------------------------------------------------------------------------------------
# hostile input: refused in OpenAI's shape, before the upstream sees anything
# ---------------------------------------------------------------------------------------------
def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A ~10 kB PNG whose header says 20000 x 20000 (400 megapixels, 1 bit per pixel)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (1 + width // 8) * 4000, 9)  # the first 4000 of 20000 zero rows
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


class Listener:
    """A TCP listener on 127.0.0.1 that counts connection attempts (a local server that must see none)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


def remote_cases(port: int):
    return [
        (f"http://127.0.0.1:{port}/a.png", "media_host_not_allowed"),  # not on the allow-list
        (f"http://localhost:{port}/a.png", "media_host_not_allowed"),  # allowed name, but http
        (f"https://localhost:{port}/a.png", "media_host_not_allowed"),  # allowed name, resolves to loopback
        (f"https://user:pw@localhost:{port}/a.png", "media_host_not_allowed"),
    ]


@pytest.mark.parametrize(
    "make, status, code",
    [
        (lambda: chat("x", "data:image/png;base64," + base64.b64encode(bomb_png()).decode()), 400, "image_too_large"),
        (lambda: chat("x", png_url(64, 64)[:-7]), 400, "invalid_base64"),  # truncated base64
        (lambda: chat("x", "data:image/png;base64,@@@notbase64@@@"), 400, "invalid_base64"),
        (
            lambda: chat("x", "data:text/plain;base64," + base64.b64encode(b"hello").decode()),
            400,
            "unsupported_image_type",
        ),
        (
            lambda: chat("x", "data:image/png;base64," + base64.b64encode(b"GIF89a not really").decode()),
            400,
            "unsupported_image_format",
        ),
        (
            lambda: chat("x", "data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode()),
            400,
            "unsupported_image_type",
        ),
        (lambda: chat("x", "file:///etc/passwd"), 400, "invalid_image_url"),
        (lambda: chat("x", *[png_url(8, 8)] * 50), 400, "too_many_images"),
        (lambda: b'{"model": "m", "messages": [', 400, "invalid_json"),
        (lambda: b"\xff\xfe\x00garbage", 400, "invalid_json"),
        (lambda: b"[1, 2]", 400, "invalid_json"),
        (lambda: {"model": "m"}, 400, "invalid_request"),
        (lambda: {"model": "m", "messages": []}, 400, "invalid_request"),
        (lambda: {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request"),
        (
            lambda: {"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            400,
            "invalid_request",
        ),
        (lambda: b"x" * (20 * 1024 * 1024), 413, "body_too_large"),  # a 20 MB body
    ],
    ids=[
        "bomb-400MP",
        "truncated-b64",
        "junk-b64",
        "text-plain",
        "png-declared-not-png",
        "svg",
        "file-url",
        "50-images",
        "malformed-json",
        "not-utf8",
        "json-array",
        "no-messages",
        "empty-messages",
        "bad-role",
        "unknown-part",
        "20MB-body",
    ],
)
def test_bad_input_refused_before_upstream(proxy, fake, make, status, code):
    start = time.monotonic()
    r = post(proxy, make())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and "type" in error
    assert time.monotonic() - start < 5  # the 400 MP bomb is refused from its header, not decoded
    assert fake.chats() == []


def test_bomb_is_small():
    assert len(bomb_png()) < 12_000


def test_remote_urls_refused_without_any_connection(proxy, fake):
    listener = Listener()
    try:
        for url, code in remote_cases(listener.port):
            r = post(proxy, chat("x", url))
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (url, r.text)
        time.sleep(0.3)
        assert listener.connections == 0
    finally:
        listener.close()
    assert fake.chats() == []


def test_wrong_request_content_type(proxy, fake):
    r = post(proxy, json.dumps(chat("x", png_url(8, 8))), headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_api_key_required_on_v1_only(proxy, fake):
    body = chat("x", png_url(8, 8))
    for key in (None, "sk-wrong", KEY + "x", KEY[:-1]):
        r = post(proxy, body, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy, api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(f"{proxy}/models").status_code == 401
    assert httpx.get(f"{proxy}/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    root = proxy.removesuffix("/v1")
    assert httpx.get(f"{root}/health").status_code == 200
    assert httpx.get(f"{root}/ready").status_code == 200
    assert httpx.get(f"{root}/metrics").status_code == 200
    assert fake.chats() == []


def test_metrics_exported(proxy, fake):
    post(proxy, chat("m", png_url(64, 64)))
    text = httpx.get(proxy.removesuffix("/v1") + "/metrics").text
    for name in (
        'zoomvlm_requests_total{path="/v1/chat/completions",status="200"}',
        "zoomvlm_policy_seconds_bucket",
        "zoomvlm_upstream_seconds_bucket",
        "zoomvlm_crops_per_request_bucket",
        "zoomvlm_rtr_bucket",
        "zoomvlm_queue_depth",
        "zoomvlm_in_flight",
        "zoomvlm_upstream_retries_total",
        'zoomvlm_requests_total{path="/v1/chat/completions",status="401"}',
        'zoomvlm_rejected_total{reason="image_too_large"}',
    ):
        assert name in text, name


# ---------------------------------------------------------------------------------------------
# load: 64 concurrent requests, each answered once with its own answer
# ---------------------------------------------------------------------------------------------
def test_64_concurrent_requests_no_mixups(proxy, fake):
    n = 64

    async def one(client, i):
        w, h = 40 + i, 30 + (i * 7) % 50
        start = time.perf_counter()
        r = await client.chat.completions.create(model="m", messages=chat(f"req-{i}", png_url(w, h))["messages"])
        return i, (w, h), r.choices[0].message.content, time.perf_counter() - start

    async def run():
        async with openai.AsyncOpenAI(base_url=proxy, api_key=KEY, max_retries=0, timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n))), 90)

    start = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - start
    assert len(results) == n
    for i, (w, h), answer, _ in results:
        assert answer.startswith(f"echo:req-{i}|images=2|sizes={w}x{h},"), answer  # its own text and image
    texts = [e["text"] for e in fake.chats()]
    assert sorted(texts) == sorted(f"req-{i}" for i in range(n))  # each reached the upstream exactly once
    latencies = sorted(r[3] for r in results)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * n) - 1]
    print(f"\n64 concurrent via proxy: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, wall {wall:.2f} s")
