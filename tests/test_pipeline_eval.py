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

from zoomvlm.core.geometry import Box, Budget
from zoomvlm.core.pipeline import build_request, run_batch
from zoomvlm.data.samples import Sample, read_appended_jsonl
from zoomvlm.evaluation.run import RunMismatchError, Shard, read_results, read_run, results_files, run_eval
from zoomvlm.policies import load_policy
from zoomvlm.policies.base import Proposal
from zoomvlm.targets.cache import CachedTarget


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
    # the default oracle (the README's upper bound) pads the human box by 2 % of the image on each side
    (p,) = load_policy("oracle").propose([None], ["q"], evidence=[[Box(0.4, 0.4, 0.5, 0.5)]])
    assert p.boxes[0].as_list(6) == [0.38, 0.38, 0.52, 0.52]


def test_an_oracle_run_names_the_samples_without_evidence_before_answering_any(tmp_path):
    from dataclasses import replace

    samples = _samples(tmp_path, 8)
    samples[5] = replace(samples[5], evidence_boxes=())
    target = EchoTarget()
    with pytest.raises(ValueError, match="1 sample\\(s\\) have none: s5"):
        run_eval(samples, load_policy("oracle"), target, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="1 sample\\(s\\) have none: s5"):  # AwaRes's oracle subset too
        run_eval(samples, load_policy("crop-set-oracle"), target, tmp_path / "run", progress=False)
    assert target.calls == 0 and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="batch_size"):
        run_eval(samples, load_policy("none"), target, tmp_path / "run", batch_size=0, progress=False)


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
    # a whole last record without its newline (a file merged by hand) is kept, and the newline is added
    text = (out / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(text.rstrip("\n"))
    assert len(read_appended_jsonl(out / "results.jsonl", repair=True)) == 5
    assert (out / "results.jsonl").read_text() == text


def test_summary_counts_format_failures_fields_and_only_the_samples_asked_for(tmp_path):
    from dataclasses import replace

    class HalfInvalid:  # every other proposal is an invalid output the policy fell back from
        name = "half-invalid"

        def propose(self, images, questions, evidence=None):
            return [Proposal((Box.full(),), error="bad box" if q[-1] in "02468" else None) for q in questions]

    samples = [replace(s, field="total" if i < 2 else "date") for i, s in enumerate(_samples(tmp_path, 5))]
    target = EchoTarget(answers_by_question={"q0": "a0", "q1": "?", "q2": "a2", "q3": "a3"})
    summary = run_eval(samples, HalfInvalid(), target, tmp_path / "run", progress=False)
    assert summary["format_failures"] == 3 and summary["format_failure_rate"] == pytest.approx(0.6)  # s0, s2, s4
    assert summary["by_field"] == {"date": pytest.approx(2 / 3), "total": 0.5}
    # a rerun on fewer samples summarises those only (the run folder still holds all five)
    summary = run_eval(samples[:3], HalfInvalid(), EchoTarget(), tmp_path / "run", progress=False)
    assert summary["n"] == 3 and summary["format_failures"] == 2 and summary["n_expected"] == 3


def test_eval_refuses_to_mix_runs(tmp_path):
    samples = _samples(tmp_path, 1)
    run_eval(samples, load_policy("none"), EchoTarget(), tmp_path / "run", progress=False)
    with pytest.raises(RunMismatchError, match="policy: was 'none', now 'center'"):
        run_eval(samples, load_policy("center"), EchoTarget(), tmp_path / "run", progress=False)


def test_eval_refuses_a_policy_whose_checkpoint_changed_under_the_same_name(tmp_path, monkeypatch, caplog):
    """A checkpoint retrained in place keeps the policy's name: the files' digest tells the two policies apart."""
    import zoomvlm.evaluation.run as run_module

    samples = _samples(tmp_path, 4)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "scorer.pt").write_bytes(b"weights v1")
    policy = load_policy("center")
    policy.checkpoints = (str(ckpt), "HuggingFaceTB/not-a-local-path")  # a hub id is skipped, not an error
    out = tmp_path / "run"
    run_eval(samples[:2], policy, EchoTarget(), out, progress=False)
    (first,) = json.loads((out / "run.json").read_text())["provenance"]
    assert first["policy_files"] and first["code"]
    # same files (a hidden file added, the folder renamed): resumes
    (ckpt / ".lock").write_text("x")
    ckpt.rename(tmp_path / "moved")
    policy.checkpoints = (str(tmp_path / "moved"),)
    target = EchoTarget()
    run_eval(samples[:3], policy, target, out, progress=False)
    assert target.calls == 1
    # another code version: allowed, recorded, warned
    monkeypatch.setattr(run_module, "code_version", lambda: "9.9.9+gdeadbeef")
    run_eval(samples[:3], policy, EchoTarget(), out, progress=False)
    history = json.loads((out / "run.json").read_text())["provenance"]
    assert [h["code"] for h in history] == [first["code"], "9.9.9+gdeadbeef"]
    assert "resumed with 9.9.9+gdeadbeef" in caplog.text
    # retrained in place: refused before any question is answered
    (tmp_path / "moved" / "scorer.pt").write_bytes(b"weights v2")
    target = EchoTarget()
    with pytest.raises(RunMismatchError, match="checkpoint files changed since"):
        run_eval(samples, policy, target, out, progress=False)
    assert target.calls == 0 and len(read_results(out / "results.jsonl")) == 3
    # a run.json from before provenance was recorded resumes and gains it
    old = tmp_path / "old"
    run_eval(samples[:1], load_policy("none"), EchoTarget(), old, progress=False)
    config = json.loads((old / "run.json").read_text())
    del config["provenance"]
    (old / "run.json").write_text(json.dumps(config))
    run_eval(samples[:2], load_policy("none"), EchoTarget(), old, progress=False)
    assert len(json.loads((old / "run.json").read_text())["provenance"]) == 1


def test_learned_policies_name_their_checkpoint_files(tmp_path):
    from zoomvlm.core.resume import files_digest
    from zoomvlm.cropvlm.proposals import default_proposals_path

    proposals = load_policy("proposals")
    assert proposals.checkpoints == (str(default_proposals_path()),)
    assert files_digest(proposals.checkpoints) is not None
    assert len(load_policy("proposals+prior").checkpoints) == 2
    assert files_digest(["no/such/path"]) is None


def test_resume_after_kill_9(tmp_path):
    """A real SIGKILL in the middle of a run, then a resume: every sample exactly once."""
    samples = _samples(tmp_path, 40)
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from pathlib import Path
        from fakes import EchoTarget
        from zoomvlm.data.samples import Sample
        from zoomvlm.evaluation.run import run_eval
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


@pytest.mark.parametrize("n_samples", [0, 1, 7, 12])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_partition_in_order(n_samples, count):
    samples = list(range(n_samples))
    parts = [Shard(i, count).select(samples) for i in range(count)]
    assert sorted(x for p in parts for x in p) == samples  # each exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(p == sorted(p) for p in parts)
    last = Shard(count - 1, count)
    assert last.select(samples[:5]) == [x for x in last.select(samples) if x < 5]  # stable as --limit grows


@pytest.mark.parametrize("spec", ["2/2", "-1/2", "0/0", "1", "a/b", "1/2/3"])
def test_bad_shard_specs_are_clear_errors(spec):
    with pytest.raises(ValueError, match="out of range|cannot read shard|at least 1"):
        Shard.parse(spec)


def test_sharded_run_merges_and_refuses_other_splits(tmp_path):
    samples = _samples(tmp_path, 7)
    out = tmp_path / "run"
    partial = run_eval(samples, load_policy("none"), EchoTarget(), out, progress=False, shard=Shard(1, 2))
    assert (partial["n"], partial["n_expected"], partial["shards"]) == (3, 7, 2)
    assert [r["id"] for r in read_run(out)] == ["s1", "s3", "s5"]
    full = run_eval(samples, load_policy("none"), EchoTarget(), out, progress=False, shard=Shard(0, 2))
    assert full["n"] == 7
    assert [p.name for p in results_files(out).values()] == ["results-00000-of-00002.jsonl",
                                                             "results-00001-of-00002.jsonl"]  # fmt: skip
    assert sorted(r["id"] for r in read_run(out)) == sorted(s.id for s in samples)
    for other in (Shard(0, 3), Shard()):
        with pytest.raises(RunMismatchError, match="split into 2 shards.*--shard i/2"):
            run_eval(samples, load_policy("none"), EchoTarget(), out, progress=False, shard=other)
    unsplit = tmp_path / "unsplit"
    run_eval(samples[:1], load_policy("none"), EchoTarget(), unsplit, progress=False)
    with pytest.raises(RunMismatchError, match="an unsplit run, but shard 0/2 was asked for; rerun with no --shard"):
        run_eval(samples, load_policy("none"), EchoTarget(), unsplit, progress=False, shard=Shard(0, 2))


def test_read_run_refuses_a_sample_in_two_shards(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results-00000-of-00002.jsonl").write_text('{"id": "s0"}\n')
    (out / "results-00001-of-00002.jsonl").write_text('{"id": "s1"}\n{"id": "s0"}\n')
    with pytest.raises(ValueError, match="'s0' appears twice"):
        read_run(out)


def test_sharded_cached_resume_after_kill_9(tmp_path):
    """Two shard processes share a run dir and a cache; both are SIGKILLed mid-run, then resumed: every
    sample exactly once, no request answered before the kill is computed again, and a rerun is free."""
    n = 40
    samples = _samples(tmp_path, n)
    out, cache = tmp_path / "run", tmp_path / "cache.sqlite"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from pathlib import Path
        from fakes import EchoTarget
        from zoomvlm.targets.cache import CachedTarget
        from zoomvlm.data.samples import Sample
        from zoomvlm.evaluation.run import Shard, run_eval
        from zoomvlm.policies import load_policy
        img = Path({str(tmp_path / "img.png")!r})
        samples = [Sample(f"s{{i}}", img, f"q{{i}}", (f"a{{i}}",), 400, 800) for i in range({n})]
        target = CachedTarget(EchoTarget(delay=0.1), {str(cache)!r})
        run_eval(samples, load_policy("center"), target, {str(out)!r}, batch_size=2, progress=False,
                 shard=Shard.parse(sys.argv[1]))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, f"{i}/2"]) for i in range(2)]
    files = [out / Shard(i, 2).filename for i in range(2)]
    deadline = time.time() + 60
    while time.time() < deadline and not all(f.exists() and f.read_text().count("\n") >= 4 for f in files):
        time.sleep(0.02)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n_before = [len(read_results(f)) for f in files]
    assert all(4 <= k < n // 2 for k in n_before), f"the kill must land mid-run in both shards: {n_before}"
    answered = CachedTarget(EchoTarget(), cache).entries()  # requests whose answers were committed before the kill
    assert answered >= sum(n_before)

    inner = EchoTarget()
    for i in range(2):
        run_eval(samples, load_policy("center"), CachedTarget(inner, cache), out, batch_size=2, progress=False,
                 shard=Shard(i, 2))  # fmt: skip
    records = read_run(out)
    assert sorted(r["id"] for r in records) == sorted(s.id for s in samples)  # each exactly once
    assert inner.calls == n - answered  # the cache hit every request made before the kill
    assert sum(r["cached"] for r in records) == answered - sum(n_before)
    assert json.loads((out / "summary.json").read_text())["n"] == n

    rerun = EchoTarget()
    summary = run_eval(samples, load_policy("center"), CachedTarget(rerun, cache), tmp_path / "again",
                       batch_size=8, progress=False)  # fmt: skip
    assert rerun.calls == 0 and summary["n"] == n
    again = {r["id"]: r for r in read_run(tmp_path / "again")}
    assert all(again[r["id"]]["cached"] for r in records)
    assert all(again[r["id"]]["target_seconds"] == r["target_seconds"] for r in records if not r["cached"])


def test_a_sample_whose_image_is_not_the_declared_size_is_refused_before_its_boxes_mislead(tmp_path):
    """Evidence boxes are pixels of the upright image: with width and height swapped (e.g. read from a photo's raw
    header before its EXIF rotation) the oracle cropped the wrong place and still scored an evidence hit."""
    from dataclasses import replace

    from zoomvlm.data.samples import DatasetError

    (sample,) = _samples(tmp_path, 1)
    swapped = replace(sample, width=sample.height, height=sample.width)
    target = EchoTarget()
    with pytest.raises(DatasetError, match="is 400x800 px .* but the data says 800x400"):
        run_batch([swapped], load_policy("oracle"), target)
    assert target.calls == 0
    (record,) = run_batch([replace(swapped, evidence_boxes=())], load_policy("none"), target)
    assert record.rtr == pytest.approx(32 * 64 / (400 * 800))  # RTR from the decoded size
