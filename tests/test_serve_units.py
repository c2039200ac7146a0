"""In-process checks of the zoom server's pieces: image limits, SSRF address checks, request parsing, payload
building, retry-after parsing, micro-batching and option validation (fast, no processes)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import threading
import time

import pytest
from PIL import Image
from test_serve_proxy import bomb_png

from zoomvlm.serve.batching import MicroBatcher
from zoomvlm.serve.chat import load_images, parse_chat_request, question_of, with_crops
from zoomvlm.serve.config import ServeConfig
from zoomvlm.serve.errors import ServeError
from zoomvlm.serve.media import MediaLimits, check_public_host, decode_data_url
from zoomvlm.serve.upstream import _retry_after

LIMITS = MediaLimits(max_image_bytes=1_000_000, max_image_pixels=4_000_000)


def data_url(image: Image.Image, fmt: str = "PNG", mime: str = "image/png") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def code_of(fn, *args) -> str:
    with pytest.raises(ServeError) as info:
        fn(*args)
    assert info.value.status == 400
    return info.value.code


def test_decode_data_url_formats_and_size():
    img = Image.new("RGB", (30, 20), "blue")
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")):
        decoded = decode_data_url(data_url(img, fmt, mime), LIMITS, "p")
        assert decoded.image.size == (30, 20) and decoded.image.mode == "RGB" and decoded.format == fmt


def test_bomb_refused_from_header_without_decoding():
    url = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
    start = time.perf_counter()
    assert code_of(decode_data_url, url, LIMITS, "p") == "image_too_large"
    assert time.perf_counter() - start < 0.5  # 400 MP at 1 bit would take seconds and 400 MB as RGB


def test_image_limits():
    big = data_url(Image.new("RGB", (2001, 2000)))  # 4_002_000 pixels > 4_000_000
    assert code_of(decode_data_url, big, LIMITS, "p") == "image_too_large"
    noisy = Image.effect_noise((300, 300), 100).convert("RGB")  # ~200 kB as PNG
    small_bytes = MediaLimits(max_image_bytes=10_000, max_image_pixels=10**8)
    assert code_of(decode_data_url, data_url(noisy), small_bytes, "p") == "image_too_large"
    truncated = data_url(Image.new("RGB", (300, 300)))[:-41]  # cut inside a base64 quantum
    assert code_of(decode_data_url, truncated, LIMITS, "p") in ("invalid_base64", "invalid_image")
    # a well-formed base64 of a PNG cut short: the header reads, the pixels do not
    png = base64.b64decode(data_url(Image.effect_noise((200, 200), 50).convert("RGB")).split(",")[1])
    cut = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
    assert code_of(decode_data_url, cut, LIMITS, "p") == "invalid_image"
    assert code_of(decode_data_url, "data:image/png,rawtext", LIMITS, "p") == "invalid_image_url"


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "::1",
                                  "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1", "100.64.0.1", "fe80::1"])  # fmt: skip
def test_non_public_addresses_refused(host):
    assert code_of(check_public_host, host, 443) == "media_host_not_allowed"


def test_public_address_allowed():
    assert check_public_host("8.8.8.8", 443) == "8.8.8.8"  # a literal: resolved without DNS


def test_parse_errors_and_question():
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ServeError) as info:
        parse_chat_request(deep)
    assert info.value.status == 400
    raw, typed = parse_chat_request(
        b'{"model": "m", "temperature": 0.2, "messages": [{"role": "user", "content": "old"},'
        b'{"role": "assistant", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "new"}]}]}'
    )
    assert question_of(typed) == "new" and raw["temperature"] == 0.2
    # errors name the field as a client wrote it (not pydantic's union branches, "content.str")
    for content, param in (([{"type": "text", "text": "a"}, {"type": "imag"}], "messages.0.content.1.type"),
                           ([{"type": "image_url"}], "messages.0.content.0.image_url"),
                           ([{"type": "text"}], "messages.0.content.0.text"),
                           ([{"type": "image_url", "image_url": {}}], "messages.0.content.0.image_url.url"),
                           (5, "messages.0.content")):  # fmt: skip
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()
        with pytest.raises(ServeError) as info:
            parse_chat_request(body)
        assert info.value.param == param, (content, info.value.param)
    # valid OpenAI bodies: "stream": null, an assistant turn's refusal part
    _, typed = parse_chat_request(json.dumps({"model": "m", "stream": None, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"role": "user", "content": "again"}]}).encode())  # fmt: skip
    assert not typed.stream and question_of(typed) == "again"


def test_a_request_a_local_target_cannot_answer_is_refused_before_any_work():
    from zoomvlm.serve.chat import check_question

    image_only = {"model": "m", "messages": [{"role": "system", "content": "read the total"},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}  # fmt: skip
    _, typed = parse_chat_request(json.dumps(image_only).encode())
    with pytest.raises(ServeError) as info:  # a local target answers the last user message's question
        check_question(typed, question_of(typed), local=True)
    assert info.value.status == 400 and info.value.param == "messages.1.content"
    check_question(typed, question_of(typed), local=False)  # proxied: the upstream reads the system prompt
    _, text_only = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": " "}]}')
    check_question(text_only, question_of(text_only), local=False)
    with pytest.raises(ServeError, match="has no text"):
        check_question(text_only, question_of(text_only), local=True)


def test_images_of_last_user_message_are_zoomed_and_payload_keeps_raw():
    url = data_url(Image.new("RGB", (40, 40)))
    body = {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": url}}]},
    ]}  # fmt: skip
    import json

    raw, typed = parse_chat_request(json.dumps(body).encode())
    images = asyncio.run(load_images(typed, LIMITS, max_images=4))
    assert [(i.message, i.part, i.zoom) for i in images] == [(0, 0, False), (2, 1, True)]
    out = with_crops(raw, images, [None, "data:g"], [[], ["data:c1", "data:c2"]], model="up")
    assert out["model"] == "up" and raw["model"] == "m"
    assert [p["image_url"]["url"] for p in out["messages"][2]["content"][1:]] == ["data:g", "data:c1", "data:c2"]
    assert len(raw["messages"][2]["content"]) == 2  # the client's request is not modified
    with pytest.raises(ServeError) as info:
        asyncio.run(load_images(typed, LIMITS, max_images=1))
    assert info.value.code == "too_many_images"


def test_retry_after_parsing():
    assert _retry_after("2") == 2.0 and _retry_after(None) is None and _retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < _retry_after(later) <= 31


def test_micro_batcher_batches_concurrent_requests():
    calls = []

    def fn(items):
        calls.append((threading.current_thread().name, list(items)))
        time.sleep(0.05)
        return [x * 10 for x in items]

    async def run():
        batcher = MicroBatcher(fn, max_batch=4, max_wait=0.05, name="t")
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        await batcher.stop()
        return results

    results = asyncio.run(run())
    assert [r for r, _ in results] == [0, 10, 20, 30, 40, 50]
    assert [len(items) for _, items in calls] == [4, 2]  # 6 concurrent submits -> 2 model calls
    assert all(name.startswith("t") for name, _ in calls)


def test_a_failing_item_fails_only_its_own_request_not_its_batch():
    def fn(items):  # fails for any batch holding the bad item, as a real policy or target would
        if "bad" in items:
            raise ValueError("a question must be a non-empty string")
        return [x.upper() for x in items]

    sizes = []

    async def run():
        batcher = MicroBatcher(fn, max_batch=4, max_wait=0.05, name="t", on_batch=sizes.append)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(x) for x in ("a", "bad", "c")), return_exceptions=True)
        await batcher.stop()
        return results

    good_a, bad, good_c = asyncio.run(run())
    assert good_a[0] == "A" and good_c[0] == "C"
    assert isinstance(bad, ValueError)
    assert sizes == [3, 1, 1, 1]  # every call is in the batch-size metric
    assert good_c[1] >= good_a[1]  # c's seconds include the failed batch and a's rerun before it


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"target": "ocr", "upstream": "http://x/v1"}, "exactly one"),
        ({"upstream": "ftp://x"}, "http"),
        ({"target": "ocr", "policy": "oracle"}, "evidence"),
        ({"target": "hf:x", "policy": "self-zoom"}, "internals"),
        ({"target": "hf:x", "policy": "attention"}, "internals"),
        ({"target": "ocr", "on_policy_error": "maybe"}, "open or fail"),
        ({"target": "ocr", "upstream_model": "m"}, "needs --upstream"),
        ({"target": "ocr", "max_images": 0}, "max-images"),
        ({"target": "ocr", "upstream_max_images": 1}, "needs --upstream"),
        # refused at start-up: a port out of range crashed after the policy loaded; a timeout <= 0 or nan made
        # every request time out (or go out without crops)
        ({"target": "ocr", "port": 70000}, "port must be in 0..65535"),
        ({"target": "ocr", "policy_timeout": -1.0}, "policy-timeout must be a finite number of seconds > 0"),
        ({"target": "ocr", "upstream_timeout": 0.0}, "upstream-timeout must be"),
        ({"target": "ocr", "body_timeout": float("nan")}, "body-timeout must be"),
        ({"target": "ocr", "batch_wait_ms": -1.0}, "batch-wait-ms must be a finite number >= 0"),
        # refused before the policy loads: every lone request waited out its policy timeout; a bad target was
        # named only after a policy had loaded
        ({"upstream": "http://x/v1", "batch_wait_ms": 3000.0, "policy_timeout": 1.0}, "shorter than --policy-timeout"),
        ({"target": "bogus"}, "unknown target"),
        ({"target": "ocr", "budget": "huge"}, "--budget"),
        ({"target": "ocr", "crop_budget": "-3"}, "--crop-budget"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServeConfig(**kwargs).validate()
