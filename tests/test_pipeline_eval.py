import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from fakes import EchoTarget
from PIL import Image

from zoomvlm.data import Sample
from zoomvlm.eval import RunMismatchError, read_results, run_eval
from zoomvlm.geometry import Box, Budget
from zoomvlm.pipeline import build_request, run_batch
from zoomvlm.policies import load_policy
from zoomvlm.policies.base import Proposal


def _samples(tmp_path, n):
    Image.new("RGB", (400, 800), "white").save(tmp_path / "img.png")
    return [
        Sample(f"s{i}", tmp_path / "img.png", f"q{i}", (f"a{i}",), 400, 800, (Box(0.1, 0.1, 0.2, 0.15),))
        for i in range(n)
    ]


def test_build_request_crops_from_original():
    image = Image.new("RGB", (1000, 2000))
    req = build_request(image, "q", Proposal((Box(0.5, 0.5, 1, 1),)), crop_budget=Budget())
    assert [im.size for im in req.images] == [(1000, 2000), (500, 1000)]  # crop cut at native resolution
    assert req.view_budgets == (None, Budget())
    # the target shrinks the global view to its budget and the crop to native (no-op)
    assert [v.size for v in req.views(Budget(max_side=100))] == [(50, 100), (500, 1000)]


def test_run_batch_record_usage_and_rtr(tmp_path):
    samples = _samples(tmp_path, 2)
    target = EchoTarget({"q0": "a0"})
    records = run_batch(samples, load_policy("center"), target, metric="exact")
    assert [r.score for r in records] == [1.0, 0.0]
    r = records[0]
    # global 32x64 + centre crop 200x400 shrunk to 32x64
    assert r.view_pixels == [32 * 64, 32 * 64]
    assert r.rtr == pytest.approx(2 * 32 * 64 / (400 * 800))
    assert r.boxes == [[0.25, 0.25, 0.75, 0.75]] and r.evidence_hit == 0.0
    full = run_batch(samples[:1], load_policy("full"), target)[0]
    assert full.rtr == 1.0 and full.evidence_hit is None


def test_oracle_needs_evidence_and_takes_smallest(tmp_path):
    oracle = load_policy("oracle:0")
    (p,) = oracle.propose([None], ["q"], evidence=[[Box(0, 0, 0.5, 0.5), Box(0.6, 0.6, 0.7, 0.7)]])
    assert p.boxes == (Box(0.6, 0.6, 0.7, 0.7),)
    with pytest.raises(ValueError, match="evaluation only"):
        oracle.propose([None], ["q"])


def test_eval_resume_skips_done_and_repairs_torn_line(tmp_path):
    samples = _samples(tmp_path, 5)
    out = tmp_path / "run"
    target = EchoTarget()
    run_eval(samples[:3], load_policy("none"), target, out, progress=False)
    # simulate a crash mid-write: half a record, no newline
    with (out / "results.jsonl").open("a") as f:
        f.write('{"id": "s3", "question": "q3", "ans')
    target = EchoTarget()
    summary = run_eval(samples, load_policy("none"), target, out, progress=False)
    assert target.calls == 2  # s3 (torn) and s4 only
    ids = [r["id"] for r in read_results(out / "results.jsonl")]
    assert sorted(ids) == ["s0", "s1", "s2", "s3", "s4"] and summary["n"] == 5


def test_eval_refuses_to_mix_runs(tmp_path):
    samples = _samples(tmp_path, 1)
    run_eval(samples, load_policy("none"), EchoTarget(), tmp_path / "run", progress=False)
    with pytest.raises(RunMismatchError, match="policy: was 'none', now 'center'"):
        run_eval(samples, load_policy("center"), EchoTarget(), tmp_path / "run", progress=False)


def test_resume_after_kill_9(tmp_path):
    """A real SIGKILL in the middle of a run, then a resume: every sample exactly once."""
    samples = _samples(tmp_path, 40)
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from pathlib import Path
        from fakes import EchoTarget
        from zoomvlm.data import Sample
        from zoomvlm.eval import run_eval
        from zoomvlm.policies import load_policy
        img = Path({str(tmp_path / "img.png")!r})
        samples = [Sample(f"s{{i}}", img, f"q{{i}}", (f"a{{i}}",), 400, 800) for i in range(40)]
        run_eval(samples, load_policy("none"), EchoTarget(delay=0.05), {str(out)!r}, batch_size=2, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    results = out / "results.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not results.exists() or results.read_text().count("\n") < 6):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(read_results(results))
    assert 6 <= n_before < 40, "the kill must land mid-run"
    target = EchoTarget()
    run_eval(samples, load_policy("none"), target, out, batch_size=2, progress=False)
    ids = [r["id"] for r in read_results(results)]
    assert sorted(ids) == sorted(s.id for s in samples)  # each exactly once
    assert target.calls == 40 - n_before
    assert json.loads((out / "summary.json").read_text())["n"] == 40
