"""The zoom server under operations: bounded queue (503 + Retry-After), fail-open and fail policy errors,
readiness when the upstream is down, remote URLs refused by default, and draining on SIGTERM. Real processes.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import pytest
from serve_fakes import free_port, start_fake_upstream, start_server, stop
from test_serve_proxy import Listener, chat, png_url


@pytest.fixture(scope="module")
def upstream():
    proc, url = start_fake_upstream()
    yield url
    stop(proc)


@pytest.fixture()
def fake(upstream):
    root = upstream.removesuffix("/v1")
    httpx.post(f"{root}/reset").raise_for_status()

    class Control:
        def script(self, items):
            httpx.post(f"{root}/control", json={"script": items}).raise_for_status()

        def log(self):
            return httpx.get(f"{root}/log").json()

        def chats(self):
            return [e for e in self.log() if "event" not in e]

    return Control()


@pytest.fixture(scope="module")
def tight(upstream):
    """One request at a time, one waiting; a policy timeout no policy can meet (so every request fails open);
    the default upstream timeout (60 s), so only a client disconnect can end a slow upstream call early."""
    args = ["--upstream", upstream, "--policy", "center", "--max-concurrency", "1", "--max-queue", "1",
            "--policy-timeout", "0.000001", "--batch-wait-ms", "0"]  # fmt: skip
    proc, url = start_server(args)
    yield url
    stop(proc)


def test_queue_full_gives_503_with_retry_after(tight, fake):
    fake.script([{"sleep": 1.5}, {"sleep": 0.5}])

    def send(i):
        time.sleep(0.2 * i)  # arrive in order: processing, waiting, refused
        return httpx.post(f"{tight}/chat/completions", json=chat(f"q{i}", png_url(32, 32)), timeout=30)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(send, range(3)))
    assert [r.status_code for r in responses] == [200, 200, 503]
    refused = responses[2]
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "overloaded"
    assert sorted(e["text"] for e in fake.chats()) == ["q0", "q1"]


def test_policy_failure_fails_open_and_is_counted(tight, fake):
    r = httpx.post(f"{tight}/chat/completions", json=chat("open", png_url(64, 64)), timeout=30)
    assert r.status_code == 200
    assert r.headers["x-zoomvlm-fail-open"] == "timeout"
    assert r.headers["x-zoomvlm-boxes"] == "[[]]"
    assert fake.chats()[0]["sizes"] == ["64x64"]  # forwarded without crops
    metrics = httpx.get(tight.removesuffix("/v1") + "/metrics").text
    assert 'zoomvlm_fail_open_total{reason="timeout"}' in metrics


def test_remote_urls_refused_by_default_without_connection(tight, fake):
    listener = Listener()
    try:
        r = httpx.post(f"{tight}/chat/completions", json=chat("x", f"http://127.0.0.1:{listener.port}/a.png"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "remote_media_disabled"
        time.sleep(0.3)
        assert listener.connections == 0
    finally:
        listener.close()
    assert fake.chats() == []


def test_client_disconnect_cancels_upstream_call(tight, fake):
    fake.script([{"sleep": 10}])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tight}/chat/completions", json=chat("bye", png_url(64, 64)), timeout=1.0)
    deadline = time.monotonic() + 3  # well before the upstream timeout (60 s): the proxy closed the call
    while time.monotonic() < deadline and not any(e.get("event") == "client_gone" for e in fake.log()):
        time.sleep(0.1)
    assert any(e.get("event") == "client_gone" for e in fake.log())  # the proxy closed its upstream call


def test_client_disconnect_mid_stream_closes_upstream(tight, fake):
    fake.script([{"chunk_delay": 1.0}])
    with httpx.stream(
        "POST",
        f"{tight}/chat/completions",
        json=chat("s", png_url(64, 64), stream=True),
        timeout=10.0,
    ) as r:
        first = next(r.iter_raw())
        assert first.startswith(b"data: ")
    deadline = time.monotonic() + 3  # well before the upstream timeout (60 s): the proxy closed the call
    while time.monotonic() < deadline and not any(e.get("event") == "client_gone" for e in fake.log()):
        time.sleep(0.1)
    assert any(e.get("event") == "client_gone" for e in fake.log())


def test_policy_fail_mode_and_upstream_down():
    dead = f"http://127.0.0.1:{free_port()}/v1"
    args = ["--upstream", dead, "--policy", "center", "--policy-timeout", "0.000001", "--batch-wait-ms", "0",
            "--on-policy-error", "fail",
            "--upstream-retries", "1", "--retry-backoff", "0.05"]  # fmt: skip
    proc, url = start_server(args)
    try:
        root = url.removesuffix("/v1")
        assert httpx.get(f"{root}/health").status_code == 200
        assert httpx.get(f"{root}/ready").status_code == 503  # upstream unreachable
        r = httpx.post(f"{url}/chat/completions", json=chat("x", png_url(32, 32)), timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "policy_error"
        r = httpx.post(f"{url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
        assert "2 attempt" in r.json()["error"]["message"]  # connection refused, retried once
    finally:
        stop(proc)


def test_sigterm_drains_in_flight_requests(upstream, fake):
    proc, url = start_server(["--upstream", upstream, "--policy", "none", "--drain-timeout", "10"])
    try:
        fake.script([{"sleep": 1.5}])
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/chat/completions", json=chat("drain", png_url(32, 32)),
                                  timeout=30)  # fmt: skip
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            r = pending.result()
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("echo:drain")
        assert proc.wait(10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    finally:
        stop(proc)
