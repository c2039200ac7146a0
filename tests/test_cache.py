"""The response cache: what it keys on, what a hit returns, and that a crashed run's requests are reused."""

import sqlite3
import time

import pytest
from fakes import EchoTarget
from PIL import Image

from zoomvlm.core.geometry import Budget
from zoomvlm.core.pipeline import run_batch
from zoomvlm.data.samples import Sample
from zoomvlm.evaluation.run import read_run, run_eval
from zoomvlm.policies import load_policy
from zoomvlm.targets.base import TargetRequest
from zoomvlm.targets.cache import CachedGeneration, CachedTarget, image_digest


def _image(color="white", size=(40, 30)):
    return Image.new("RGB", size, color)


def _req(question="q", color="white", **kw):
    return TargetRequest((_image(color),), question, **kw)


def test_hit_returns_original_answer_and_usage_marked_cached(tmp_path):
    inner = EchoTarget({"q": "forty"}, delay=0.01)
    cached = CachedTarget(inner, tmp_path / "c.sqlite")
    assert cached.name == inner.name and cached.budget == inner.budget  # run configs match with or without
    (first,) = cached.generate([_req()])
    assert not getattr(first, "cached", False) and inner.calls == 1
    (again,) = cached.generate([_req()])  # a new image object with the same pixels
    assert inner.calls == 1 and isinstance(again, CachedGeneration) and again.cached
    assert again.text == "forty"
    assert again.usage == first.usage and again.usage.seconds == pytest.approx(0.01)  # the original call's time
    assert (cached.hits, cached.misses) == (1, 1)


@pytest.mark.parametrize(
    "change",
    [
        {"question": "another"},
        {"color": "black"},  # other pixels
        {"view_budgets": (Budget(max_side=10),)},
    ],
)
def test_any_change_of_request_content_misses(tmp_path, change):
    inner = EchoTarget()
    cached = CachedTarget(inner, tmp_path / "c.sqlite")
    cached.generate([_req()])
    cached.generate([_req(**change)])
    assert inner.calls == 2 and cached.hits == 0


def test_target_identity_separates_budgets_and_settings(tmp_path):
    path = tmp_path / "c.sqlite"
    CachedTarget(EchoTarget(budget=Budget(max_side=64)), path).generate([_req()])
    for target, extra in [(EchoTarget(budget=Budget(max_side=32)), None), (EchoTarget(), {"max_new_tokens": 8})]:
        CachedTarget(target, path, identity=extra).generate([_req()])
        assert target.calls == 1, "a differently configured target must not reuse answers"
    same = EchoTarget(budget=Budget(max_side=64))
    CachedTarget(same, path).generate([_req()])
    assert same.calls == 0  # a new process/instance with the same identity hits the file


def test_two_endpoints_serving_one_model_name_do_not_share_answers(tmp_path):
    import httpx

    from zoomvlm.targets.openai import OpenAITarget

    def server(text):
        def handler(request):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            return httpx.Response(200, json={"choices": [choice], "usage": {"prompt_tokens": 1}})

        return httpx.MockTransport(handler)

    path = tmp_path / "c.sqlite"
    a = OpenAITarget("llava", base_url="http://a.test/v1", api_key="k", transport=server("A says 12"))
    b = OpenAITarget("llava", base_url="http://b.test/v1", api_key="k", transport=server("B says 7"))
    short = OpenAITarget("llava", base_url="http://a.test/v1", api_key="k", max_tokens=1, transport=server("A"))
    assert CachedTarget(a, path).generate([_req()])[0].text == "A says 12"
    for target, text in ((b, "B says 7"), (short, "A")):
        cached = CachedTarget(target, path)
        assert cached.generate([_req()])[0].text == text and cached.hits == 0


def test_mixed_batch_sends_only_misses_in_order(tmp_path):
    inner = EchoTarget({"a": "A", "b": "B", "c": "C"})
    cached = CachedTarget(inner, tmp_path / "c.sqlite")
    cached.generate([_req("b")])
    out = cached.generate([_req("a"), _req("b"), _req("c")])
    assert [g.text for g in out] == ["A", "B", "C"]
    assert [r.question for r in inner.requests] == ["b", "a", "c"]
    assert [getattr(g, "cached", False) for g in out] == [False, True, False]


def test_loglikelihood_cached_per_answer(tmp_path):
    inner = EchoTarget()
    cached = CachedTarget(inner, tmp_path / "c.sqlite")
    assert cached.loglikelihood([_req(answer="abc"), _req(answer="abcdef")]) == [-3.0, -6.0]
    assert cached.loglikelihood([_req(answer="abcdef"), _req(answer="xy")]) == [-6.0, -2.0]
    assert inner.calls == 3  # abc, abcdef, xy
    cached.generate([_req()])
    assert inner.calls == 4  # a generation is not a likelihood of the same request
    with pytest.raises(ValueError, match="request 0 has no answer"):
        cached.loglikelihood([_req()])


def test_image_digest_is_of_pixels():
    assert image_digest(_image()) == image_digest(_image())
    img = _image()
    img.putpixel((3, 4), (254, 255, 255))
    assert image_digest(img) != image_digest(_image())
    assert image_digest(_image(size=(30, 40))) != image_digest(_image())  # same bytes, other shape


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "c.sqlite"
    bad.write_text("this is not sqlite, just some text long enough to have a header" * 10)
    with pytest.raises(sqlite3.DatabaseError):
        CachedTarget(EchoTarget(), bad)


def test_records_say_cached_and_keep_original_timings(tmp_path):
    Image.new("RGB", (400, 800), "white").save(tmp_path / "img.png")
    samples = [Sample(f"s{i}", tmp_path / "img.png", f"q{i}", ("a",), 400, 800) for i in range(3)]
    cache = tmp_path / "c.sqlite"
    first = run_batch(samples, load_policy("center"), CachedTarget(EchoTarget(delay=0.02), cache))
    inner = EchoTarget()
    again = run_batch(samples, load_policy("center"), CachedTarget(inner, cache))
    assert inner.calls == 0
    assert [r.cached for r in first] == [False] * 3 and [r.cached for r in again] == [True] * 3
    assert [r.target_seconds for r in again] == [r.target_seconds for r in first] == pytest.approx([0.02] * 3)
    assert [r.prediction for r in again] == [r.prediction for r in first]


def test_cache_serves_requests_made_before_a_crash(tmp_path):
    """Requests answered and cached but whose results line was never written (a crash in between) are
    not recomputed on resume."""
    Image.new("RGB", (400, 800), "white").save(tmp_path / "img.png")
    samples = [Sample(f"s{i}", tmp_path / "img.png", f"q{i}", ("a",), 400, 800) for i in range(6)]
    cache = tmp_path / "c.sqlite"
    policy = load_policy("center")
    # what run_eval does for its first batch before it writes results.jsonl: the process "dies" here
    run_batch(samples[:4], policy, CachedTarget(EchoTarget(), cache))
    inner = EchoTarget()
    run_eval(samples, policy, CachedTarget(inner, cache), tmp_path / "run", batch_size=4, progress=False)
    assert inner.calls == 2
    records = read_run(tmp_path / "run")
    assert [r["id"] for r in records] == [s.id for s in samples]
    assert [r["cached"] for r in records] == [True] * 4 + [False] * 2


def test_processes_opening_one_fresh_cache_at_once_all_start(tmp_path):
    """Shards started together on a new cache file race to switch it to WAL; SQLite answers the loser "database
    is locked" at once (about one start in eight here), which used to kill that shard before its first request."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from fakes import EchoTarget
        from PIL import Image
        from zoomvlm.targets.base import TargetRequest
        from zoomvlm.targets.cache import CachedTarget
        go = Path(sys.argv[2])
        while not go.exists():  # start together
            time.sleep(0.001)
        cached = CachedTarget(EchoTarget(), sys.argv[1])
        cached.generate([TargetRequest((Image.new("RGB", (8, 8)),), "q" + sys.argv[3])])
    """)
    failures = []
    for trial in range(12):
        path, go = tmp_path / f"cache{trial}.sqlite", tmp_path / f"go{trial}"
        procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(go), str(i)],
                                  stderr=subprocess.PIPE, text=True) for i in range(4)]  # fmt: skip
        time.sleep(0.6)  # every process is waiting at the start line
        go.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            if proc.returncode:
                failures.append(err.strip().splitlines()[-1])
        if not failures:
            with sqlite3.connect(path) as conn:
                assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
                assert conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 4
    assert not failures, failures


def test_palette_images_with_other_palettes_and_a_retrained_hf_checkpoint_never_share_answers(tmp_path):
    """Palette bytes are indices: red and blue over the same indices hashed alike. An hf: target's name is its path,
    so a checkpoint retrained in place was answered from the old one's cache."""
    from zoomvlm.targets.cache import target_identity
    from zoomvlm.targets.hf import HFTarget

    red, blue = Image.new("P", (4, 4)), Image.new("P", (4, 4))
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    assert red.tobytes() == blue.tobytes() and image_digest(red) != image_digest(blue)

    class Stub:  # an HFTarget's identity without loading a model
        dtype = "torch.float32"
        config = object()

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"v1")
    target = HFTarget(str(folder), model=Stub(), processor=object())
    before = target_identity(target)
    (folder / "model.safetensors").write_bytes(b"v2")
    retrained = HFTarget(str(folder), model=Stub(), processor=object())
    assert target_identity(retrained) != before and target_identity(retrained)["name"] == before["name"]
    longer = HFTarget(str(folder), model=Stub(), processor=object(), max_new_tokens=64)
    assert target_identity(longer) != target_identity(retrained)
