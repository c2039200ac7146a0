"""End to end on real receipts with the real reader: ``zoomvlm serve --target ocr --policy vlm`` (local mode),
and ``zoomvlm serve --upstream`` (the shipped learned cropper) in front of a second ``zoomvlm serve --target ocr``
(proxy mode). The official ``openai`` client is the client. Slow: three servers, each loads the OCR reader
and/or the cropper, and every answer is a real OCR pass (~0.5-4 s on 2 busy cores).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import openai
import pytest
from serve_fakes import start_server, stop

from zoomvlm.core.metrics import score_answer
from zoomvlm.data import load_jsonl

pytestmark = pytest.mark.slow

SHARED_VAL = Path(__file__).resolve().parents[1].parent.parent / "shared" / "data" / "receipts" / "val.jsonl"


def sample(samples, sample_id):
    return next(s for s in samples if s.id == sample_id)


def ask(base_url: str, s, stream: bool = False):
    """One question about one receipt (the JPEG file's own bytes as a data URL) through the openai client."""
    url = "data:image/jpeg;base64," + base64.b64encode(Path(s.image).read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": s.question}]}]  # fmt: skip
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    if stream:
        chunks = client.chat.completions.create(model="receipts", messages=messages, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), None
    raw = client.chat.completions.with_raw_response.create(model="receipts", messages=messages)
    return raw.parse().choices[0].message.content, raw.headers


def test_local_mode_answers_like_the_library(demo_samples, ocr_target):
    from zoomvlm.core.pipeline import run_batch
    from zoomvlm.policies import load_policy

    proc, url = start_server(["--target", "ocr", "--policy", "vlm"])
    try:
        s = sample(demo_samples, "sroie_017_total")  # `none` misses this total, `vlm` reads it
        answer, headers = ask(url, s)
        record = run_batch([s], load_policy("vlm"), ocr_target)[0]  # the session's reader (ocr at 384 px)
        assert answer == record.prediction  # the same policy -> views -> target path as `zoomvlm eval`
        assert json.loads(headers["x-zoomvlm-boxes"]) == [record.boxes]
        assert float(headers["x-zoomvlm-rtr"]) == pytest.approx(record.rtr, abs=1e-4)
        assert score_answer("contains", answer, s.answers) == 1.0
        if SHARED_VAL.is_file():  # a receipt of the shared val split (not among the bundled ones)
            val = next(v for v in load_jsonl(SHARED_VAL) if not v.id.startswith(("sroie_017", "sroie_022")))
            answer, headers = ask(url, val)
            assert answer and len(json.loads(headers["x-zoomvlm-boxes"])[0]) == 1
            assert 0 < float(headers["x-zoomvlm-rtr"]) < 0.5
    finally:
        stop(proc)


def test_proxy_mode_upstream_receives_the_crop(demo_samples):
    upstream_proc, upstream = start_server(["--target", "ocr", "--policy", "none"])
    proxy_proc = None
    try:
        # --budget 384 = the reader's own budget, so the proxy's views are not shrunk a second time upstream
        proxy_proc, proxy = start_server(["--upstream", upstream, "--policy", "vlm", "--budget", "384"])
        s = sample(demo_samples, "sroie_048_total")  # `none` misses this total, `vlm` reads it
        direct, _ = ask(upstream, s)
        assert score_answer("contains", direct, s.answers) == 0.0  # the upstream alone cannot read it
        zoomed, headers = ask(proxy, s)
        assert score_answer("contains", zoomed, s.answers) == 1.0  # it can with the crop the proxy appended
        assert len(json.loads(headers["x-zoomvlm-boxes"])[0]) == 1
        streamed, _ = ask(proxy, s, stream=True)  # SSE from the upstream passed through
        assert streamed == zoomed
    finally:
        if proxy_proc is not None:
            stop(proxy_proc)
        stop(upstream_proc)


def test_local_mode_hf_target_batches_concurrent_clients(tiny_smolvlm_init):
    """``--target hf:FOLDER`` (a tiny random-weight SmolVLM): concurrent clients share batched target calls."""
    import asyncio

    from test_serve_proxy import png_url

    proc, url = start_server(["--target", f"hf:{tiny_smolvlm_init}", "--policy", "center", "--max-batch", "4",
                              "--batch-wait-ms", "200"])  # fmt: skip
    try:

        async def one(client, i):
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(64 + i, 48)}},
                                                     {"type": "text", "text": f"question {i}?"}]}]  # fmt: skip
            raw = await client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=2)
            return raw.parse(), raw.headers

        async def run():
            async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as client:
                return await asyncio.gather(*(one(client, i) for i in range(4)))

        for completion, headers in asyncio.run(run()):
            assert completion.model == "tiny" and isinstance(completion.choices[0].message.content, str)
            assert json.loads(headers["x-zoomvlm-boxes"]) == [[[0.25, 0.25, 0.75, 0.75]]]
            assert completion.usage.prompt_tokens > 0  # the hf target counts its tokens
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert "zoomvlm_upstream_seconds_count 4.0" in metrics
        assert 'zoomvlm_batch_size_sum{stage="target"} 4.0' in metrics
        calls = float(metrics.split('zoomvlm_batch_size_count{stage="target"} ')[1].split()[0])
        assert calls < 4  # 4 concurrent clients, fewer target calls
    finally:
        stop(proc)
