"""The zoom server in process (FastAPI TestClient, a scripted upstream on httpx.MockTransport): what reaches the
upstream and the client for photos with an EXIF orientation, requests too large in total, gzipped streams and
hostile Retry-After values (fast, no processes)."""

from __future__ import annotations

import base64
import gzip
import io
import json

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from zoomvlm.core.geometry import Box
from zoomvlm.policies.base import Proposal
from zoomvlm.serve.app import ZoomService, create_app
from zoomvlm.serve.config import ServeConfig
from zoomvlm.serve.upstream import Upstream, _retry_after


class CentrePolicy:
    name = "center"

    def propose(self, images, questions, evidence=None):
        return [Proposal(boxes=(Box(0.25, 0.25, 0.75, 0.75),)) for _ in images]


def _answer() -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


def client_for(handler, **options) -> tuple[TestClient, list]:
    seen: list = []

    def recording(request: httpx.Request):
        seen.append(json.loads(request.content) if request.method == "POST" else None)
        return handler(request)

    options.setdefault("upstream_retries", 0)
    config = ServeConfig(upstream="http://up.test/v1", policy="center", **options)
    config.validate()
    service = ZoomService(config, CentrePolicy())
    service.upstream = Upstream("http://up.test/v1", "", config.upstream_timeout, config.upstream_retries,
                                config.retry_backoff, config.max_retry_after,
                                transport=httpx.MockTransport(recording))  # fmt: skip
    return TestClient(create_app(service), raise_server_exceptions=False), seen


def chat(*urls: str, **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "total?"}]
    return {"model": "m", "messages": [{"role": "user", "content": parts}], **extra}


def image_url(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def sent_images(body: dict) -> list[Image.Image]:
    urls = [p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    return [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in urls]


@pytest.mark.parametrize("size", [(400, 200), (1600, 800)])  # forwarded as sent, and shrunk to the budget
def test_a_phone_photo_stored_sideways_reaches_the_upstream_upright_with_its_crops(size):
    w, h = size
    raw = Image.new("RGB", (w, h), "white")
    raw.paste((255, 0, 0), (0, 0, w // 4, h))  # a red band on the stored left: the TOP once upright (EXIF 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    client, seen = client_for(lambda r: httpx.Response(200, json=_answer()), budget="side:768")
    with client:
        reply = client.post("/v1/chat/completions", json=chat(image_url(raw, "JPEG", exif=exif.tobytes())))
    assert reply.status_code == 200
    views = sent_images(seen[-1])
    assert len(views) == 2  # the global view and the centre crop
    for view in views:
        assert view.height > view.width, view.size  # portrait, as the photo is seen
        assert view.getexif().get(0x0112, 1) == 1  # no tag left for the upstream to apply a second time
    top = views[0].convert("RGB").getpixel((views[0].width // 2, 2))
    assert top[0] > 200 and top[1] < 80  # the red band is at the top


def test_a_request_over_the_total_pixel_limit_is_refused_before_the_upstream():
    client, seen = client_for(lambda r: httpx.Response(200, json=_answer()), max_request_pixels=1_000_000)
    url = image_url(Image.new("RGB", (800, 800), "white"))  # 0.64 MP each: one fits, two do not
    with client:
        one = client.post("/v1/chat/completions", json=chat(url))
        two = client.post("/v1/chat/completions", json=chat(url, url))
    assert one.status_code == 200
    assert two.status_code == 400 and two.json()["error"]["code"] == "image_too_large"
    assert "add up to" in two.json()["error"]["message"] and len(seen) == 1


def test_a_gzipped_upstream_stream_reaches_the_client_as_plain_events():
    events = b'data: {"choices": [{"delta": {"content": "ok"}}]}\n\ndata: [DONE]\n\n'

    def gzipped(request: httpx.Request):
        headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
        return httpx.Response(200, headers=headers, content=gzip.compress(events))

    client, _ = client_for(gzipped)
    url = image_url(Image.new("RGB", (64, 64), "white"))
    with client:
        reply = client.post("/v1/chat/completions", json=chat(url, stream=True))
    assert reply.status_code == 200 and reply.content == events


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_a_non_finite_retry_after_is_ignored_and_the_client_gets_a_clean_429(value):
    assert _retry_after(value) is None
    client, _ = client_for(lambda r: httpx.Response(429, headers={"retry-after": value}, json={"error": "slow"}))
    url = image_url(Image.new("RGB", (64, 64), "white"))
    with client:
        reply = client.post("/v1/chat/completions", json=chat(url))
    assert reply.status_code == 429 and reply.headers["retry-after"].isdigit()


def test_a_retry_after_beyond_the_cap_is_passed_on_not_waited_for():
    """An upstream asking to wait 4 s with --max-retry-after 1: the client gets the 429 (and the wait) at once
    instead of a request slot held through the retries (an upstream saying 3600 would hold it for an hour)."""
    import time

    client, seen = client_for(lambda r: httpx.Response(429, headers={"retry-after": "4"}, json={"error": "slow"}),
                              upstream_retries=2, max_retry_after=1.0, retry_backoff=0.01)  # fmt: skip
    url = image_url(Image.new("RGB", (64, 64), "white"))
    with client:
        start = time.perf_counter()
        reply = client.post("/v1/chat/completions", json=chat(url))
        elapsed = time.perf_counter() - start
    assert reply.status_code == 429 and reply.headers["retry-after"] == "4"
    assert len(seen) == 1 and elapsed < 3.0
    # within the cap it is waited for and retried
    client, seen = client_for(lambda r: httpx.Response(429, headers={"retry-after": "0"}, json={"error": "slow"}),
                              upstream_retries=2, max_retry_after=1.0, retry_backoff=0.01)  # fmt: skip
    with client:
        assert client.post("/v1/chat/completions", json=chat(url)).status_code == 429
    assert len(seen) == 3


# -- local mode -------------------------------------------------------------------------------------------------


class NoZoom:
    name = "none"

    def propose(self, images, questions, evidence=None):
        return [Proposal() for _ in images]


def local_client(target, policy=None, **options) -> TestClient:
    config = ServeConfig(target="hf:tiny", policy="none", **options)
    config.validate()
    return TestClient(create_app(ZoomService(config, policy or NoZoom(), target=target)),
                      raise_server_exceptions=False)  # fmt: skip


def test_local_rtr_is_counted_as_zoomvlm_eval_counts_it_for_an_hf_target(tiny_smolvlm_init, tmp_path):
    """An hf: target counts visual tokens: without zoom RTR is 1.0, as in `zoomvlm eval`, not the pixels its
    processor made of the view over the image's pixels."""
    from zoomvlm.core.pipeline import run_batch
    from zoomvlm.data.samples import Sample
    from zoomvlm.targets import load_target

    target = load_target(f"hf:{tiny_smolvlm_init}", budget=None)
    image = Image.new("RGB", (600, 400), "white")
    image.save(tmp_path / "a.png")
    record = run_batch([Sample("a", tmp_path / "a.png", "total?", ("x",), 600, 400)], NoZoom(), target)[0]
    with local_client(target) as client:
        reply = client.post("/v1/chat/completions", json=chat(image_url(image), max_tokens=2))
    assert reply.status_code == 200 and record.rtr_unit == "tokens"
    assert float(reply.headers["x-zoomvlm-rtr"]) == pytest.approx(record.rtr) == pytest.approx(1.0)
    assert reply.json()["zoomvlm"]["rtr_unit"] == "tokens"


def test_an_unhandled_error_is_counted_as_500_not_as_a_client_that_left(tiny_smolvlm_init, monkeypatch):
    from zoomvlm.targets import load_target

    target = load_target(f"hf:{tiny_smolvlm_init}", budget=None)

    def fail(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(ZoomService, "answer_local", fail)
    with local_client(target) as client:
        reply = client.post("/v1/chat/completions", json=chat(image_url(Image.new("RGB", (64, 64), "white"))))
        metrics = client.get("/metrics").text
    assert reply.status_code == 500
    assert 'status="500"} 1.0' in metrics and 'status="499"' not in metrics


def test_a_lone_surrogate_is_refused_before_any_model_work():
    calls = []
    client, _ = client_for(lambda r: calls.append(r) or httpx.Response(200, json=_answer()))
    body = json.dumps(chat(image_url(Image.new("RGB", (64, 64), "white"))))
    body = body.replace('"model": "m"', '"model": "\\ud800"')  # valid JSON, not valid text
    with client:
        reply = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json" and calls == []


def test_target_ms_is_the_batched_call_the_client_waited_for_not_its_share(tiny_smolvlm_init):
    """A micro-batch of 4 that takes 1.5 s: each client waited 1.5 s (Usage.seconds, 0.375 s, is its share)."""
    from zoomvlm.targets import load_target
    from zoomvlm.targets.base import Generation, Usage

    config = ServeConfig(target="hf:tiny", policy="none")
    config.validate()
    service = ZoomService(config, NoZoom(), target=load_target(f"hf:{tiny_smolvlm_init}", budget=None))

    async def batched(request):
        return Generation("ok", Usage(view_pixels=(64 * 64,), seconds=0.375)), 1.5

    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        service.target_batcher.submit = batched
        reply = client.post("/v1/chat/completions", json=chat(image_url(Image.new("RGB", (64, 64), "white"))))
        metrics = client.get("/metrics").text
    assert reply.json()["zoomvlm"]["target_ms"] == 1500.0
    assert "zoomvlm_upstream_seconds_sum 1.5" in metrics


def test_an_answer_cut_by_the_generation_limit_finishes_with_length():
    from zoomvlm.core.geometry import Budget
    from zoomvlm.targets.base import Generation, Usage

    class Limited:  # a local target with a generation limit of 8 tokens
        name, budget, max_new_tokens = "limited", Budget(), 8

        def __init__(self, used):
            self.used = used

        def generate(self, requests):
            return [Generation("x", Usage(view_pixels=(64 * 64,), prompt_tokens=5, completion_tokens=self.used))
                    for _ in requests]  # fmt: skip

    image = image_url(Image.new("RGB", (64, 64), "white"))
    for used, finish in ((3, "stop"), (8, "length")):
        with local_client(Limited(used)) as client:
            body = client.post("/v1/chat/completions", json=chat(image)).json()
            stream = client.post("/v1/chat/completions", json=chat(image, stream=True)).text
        assert body["choices"][0]["finish_reason"] == finish
        assert f'"finish_reason": "{finish}"' in stream


def test_the_local_rtr_token_count_runs_in_the_target_worker_not_on_the_event_loop(tiny_smolvlm_init, monkeypatch):
    """Counting the native reference's visual tokens runs the processor (seconds for a 24 MP photo): on the event
    loop it stalled every client, and it used the processor beside the target's own thread."""
    import threading

    from zoomvlm.targets import load_target

    target = load_target(f"hf:{tiny_smolvlm_init}", budget=None)
    threads = []
    original = ZoomService._local_rtr

    def recording(self, zoomed, usage):
        threads.append(threading.current_thread().name)
        return original(self, zoomed, usage)

    monkeypatch.setattr(ZoomService, "_local_rtr", recording)
    with local_client(target) as client:
        reply = client.post("/v1/chat/completions", json=chat(image_url(Image.new("RGB", (64, 64))), max_tokens=2))
    assert reply.status_code == 200 and len(threads) == 1
    assert threads[0].startswith("zoomvlm-target"), threads


def test_a_stalled_upload_is_cut_off_with_408_instead_of_holding_its_slot():
    import asyncio

    from zoomvlm.serve.app import _read_body_within
    from zoomvlm.serve.errors import ServeError

    class Stalled:  # sends one byte of its body, then nothing
        headers: dict = {}

        async def stream(self):
            yield b"{"
            await asyncio.sleep(3600)

    class Whole:
        headers: dict = {}

        async def stream(self):
            yield b"{}"

    with pytest.raises(ServeError) as err:
        asyncio.run(_read_body_within(Stalled(), 1000, 0.1))
    assert err.value.status == 408 and "within 0.1 s" in str(err.value)
    assert asyncio.run(_read_body_within(Whole(), 1000, 0.1)) == b"{}"


def test_the_upstreams_refusal_of_the_servers_key_on_models_is_a_502_without_its_body():
    """It was passed through as 401 with the upstream's body (which echoed the server's masked key): the openai
    client blamed the CLIENT's key."""
    body = {"error": {"message": "Incorrect API key provided: sk-proj-****Xy9Q", "code": "invalid_api_key"}}
    client, _ = client_for(lambda r: httpx.Response(401, json=body))
    with client:
        reply = client.get("/v1/models")
    assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_auth"
    assert "sk-proj" not in reply.text
    ok, _ = client_for(lambda r: httpx.Response(200, json={"object": "list", "data": []}))
    with ok:
        assert ok.get("/v1/models").json() == {"object": "list", "data": []}


def test_a_client_gone_mid_upload_is_counted_as_499_not_a_server_error():
    """Half a body, then the client disconnects: 499 (docs/serve.md), not a 500 with a traceback."""
    import asyncio

    client, _ = client_for(lambda r: httpx.Response(200, json=_answer()))
    app = client.app

    async def run():
        async with app.router.lifespan_context(app):
            messages = [{"type": "http.request", "body": b'{"model": "m", "mess', "more_body": True},
                        {"type": "http.disconnect"}]  # fmt: skip
            sent = []

            async def receive():
                if messages:
                    return messages.pop(0)
                await asyncio.sleep(3600)

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                     "query_string": b"", "root_path": "", "server": ("t", 80), "client": ("c", 1),
                     "headers": [(b"content-type", b"application/json"), (b"content-length", b"500")]}  # fmt: skip
            await app(scope, receive, send)
            return [m.get("status") for m in sent if m["type"] == "http.response.start"]

    assert asyncio.run(run()) == [499]


def test_a_proxied_image_only_turn_goes_upstream_with_its_question_in_the_system_prompt():
    client, seen = client_for(lambda r: httpx.Response(200, json=_answer()))
    url = image_url(Image.new("RGB", (64, 64), "white"))
    image_only = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    body = {"model": "m", "messages": [{"role": "system", "content": "Read the total."}, image_only]}
    with client:
        reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200 and len(seen) == 1
