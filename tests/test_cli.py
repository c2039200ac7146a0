"""The command line, run as a user would (subprocesses for the entry point, main() for speed elsewhere)."""

import json
import subprocess
import sys

import pytest
from fakes import EchoTarget
from PIL import Image

from zoomvlm.cli.main import demo_data_path, main
from zoomvlm.data.samples import load_jsonl


def test_help_is_instant_and_explains():
    out = subprocess.run([sys.executable, "-m", "zoomvlm.cli", "--help"], capture_output=True, text=True, check=True)
    for word in ("ask", "eval", "demo", "openai:MODEL", "oracle", "pixels:200000"):
        assert word in out.stdout
    # heavy libraries are imported by commands, not by --help
    code = "import sys, zoomvlm.cli.main; print('torch' in sys.modules, 'rapidocr' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False False"


def test_ask_prints_answer_cost_and_saves_picture(tmp_path, capsys):
    image = demo_data_path().parent / "images" / "sroie_017.jpg"
    assert main(["ask", str(image), "How much was paid in total?", "--policy", "center", "--answer", "39.80",
                 "--save", str(tmp_path / "crop.png")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "policy center: boxes" in out and "RTR" in out and "contains vs ['39.80']" in out
    with Image.open(tmp_path / "crop.png") as img:
        assert img.width == 1200 * 835 // 2333 or img.width > 100


def test_ask_json_is_strict_json_and_a_bad_save_path_fails_before_anything_runs(tmp_path, capsys):
    image = demo_data_path().parent / "images" / "sroie_017.jpg"
    assert main(["ask", str(image), "How much was paid in total?", "--policy", "none", "--json"]) == 0
    record = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert record["score"] is None  # no --answer: unscored (was NaN, which JSON parsers refuse)
    for save, says in (("x.txt", "unknown picture format '.txt'"), ("no/such/folder/x.png", "does not exist")):
        assert main(["ask", str(image), "q", "--policy", "none", "--save", str(tmp_path / save)]) == 2
        err = capsys.readouterr()
        assert says in err.err and err.out == ""  # refused before the target answered


def test_eval_writes_results_and_resumes(tmp_path, capsys):
    args = ["eval", "--data", str(demo_data_path()), "--policy", "oracle", "--limit", "2", "--out", str(tmp_path),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "oracle -> ocr@side:384" in table and "accuracy" in table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n"] == 2 and summary["evidence_hit_rate"] == 1.0
    assert main(args[:5] + ["--limit", "3", "--out", str(tmp_path), "--no-progress"]) == 0  # resume to 3
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [s.id for s in load_jsonl(demo_data_path())[:3]]


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["eval", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "error: dataset file not found" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "x.jpg"), "q", "--policy", "oracle"]) == 2
    assert "needs human evidence boxes" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "x.jpg"), "q", "--policy", "crop-set-oracle@side:512"]) == 2
    assert "crop-set-oracle policy needs human evidence boxes" in capsys.readouterr().err
    image = demo_data_path().parent / "images" / "sroie_017.jpg"
    assert main(["ask", str(image), "q", "--policy", "crop-set-fixed:0", "--budget", "200"]) == 2
    assert "do not apply to crop-set policies" in capsys.readouterr().err
    assert main(["ask", str(image), "  ", "--policy", "none"]) == 2
    assert "a question must be a non-empty string" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "x.jpg"), "q", "--budget", "huge"]) == 2
    assert "cannot read budget" in capsys.readouterr().err


def test_demo_runs_offline(tmp_path):
    out = subprocess.run(["zoomvlm", "demo", "--limit", "2", "--out", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    for policy in ("none", "center", "vlm", "oracle", "full"):
        assert (tmp_path / f"{policy}.png").stat().st_size > 10_000
        assert policy in out.stdout
    # the shipped learned cropper writes valid boxes (an invalid one would fall back to the whole image)
    records = [json.loads(line) for line in (tmp_path / "vlm" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["policy_error"] is None, r["policy_raw"]
        assert len(r["boxes"]) == 1 and r["boxes"][0] != [0.0, 0.0, 1.0, 1.0]


def test_demo_replaces_only_the_run_folders_it_wrote(tmp_path, capsys):
    """`zoomvlm demo --out runs` next to the user's own runs/none must not wipe it."""
    from zoomvlm.cli.main import DEMO_MARK, DEMO_POLICIES

    mine = tmp_path / "none"
    mine.mkdir()
    (mine / "results.jsonl").write_text('{"id": "x"}\n')
    assert main(["demo", "--out", str(tmp_path), "--limit", "1", "--no-progress"]) == 2
    assert "none exists and was not written by zoomvlm demo" in capsys.readouterr().err
    assert (mine / "results.jsonl").read_text() == '{"id": "x"}\n'
    # a `zoomvlm eval --policy none --out runs/none` run of the user's (same three files; its run.json names data)
    (mine / "run.json").write_text(json.dumps({"data": "/my/data.jsonl", "policy": "none", "target": "ocr@side:384"}))
    assert main(["demo", "--out", str(tmp_path), "--limit", "1", "--no-progress"]) == 2
    assert (mine / "results.jsonl").read_text() == '{"id": "x"}\n'
    capsys.readouterr()
    for name in DEMO_POLICIES:  # the demo's own folders from an earlier run: replaced
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / DEMO_MARK).write_text("")
    (mine / DEMO_MARK).unlink()  # ... also one written before the demo marked its folders: its three files only
    (mine / "run.json").write_text(json.dumps({"policy": "none", "target": "ocr@side:384"}))
    assert main(["demo", "--out", str(tmp_path), "--limit", "1", "--no-progress"]) == 0
    assert len((mine / "results.jsonl").read_text().splitlines()) == 1 and (mine / DEMO_MARK).exists()
    assert '"id": "x"' not in (mine / "results.jsonl").read_text()


def test_eval_shards_and_cache(tmp_path, capsys, monkeypatch):
    # the wiring of --shard and --cache is under test here, not the reader: answer with a fake target
    monkeypatch.setattr("zoomvlm.targets.load_target", lambda spec, budget=None: EchoTarget())
    base = ["eval", "--data", str(demo_data_path()), "--policy", "oracle", "--limit", "2", "--no-progress",
            "--cache", str(tmp_path / "cache.sqlite")]  # fmt: skip
    run = tmp_path / "run"
    assert main([*base, "--out", str(run), "--shard", "1/2"]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 samples done" in err and "0 hits, 1 computed" in err
    assert main([*base, "--out", str(run), "--shard", "0/2"]) == 0
    assert json.loads((run / "summary.json").read_text())["n"] == 2
    assert main([*base, "--out", str(tmp_path / "again")]) == 0  # same requests, other run: all from the cache
    err = capsys.readouterr().err
    assert "2 hits, 0 computed" in err and "samples done" not in err
    assert main([*base, "--out", str(run), "--shard", "2/2"]) == 2
    assert "shard index 2 is out of range for 2 shards" in capsys.readouterr().err
    assert main([*base, "--out", str(run), "--shard", "0/3"]) == 2
    assert "split into 2 shards" in capsys.readouterr().err
    records = [json.loads(line) for f in sorted(run.glob("results-*.jsonl")) for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(s.id for s in load_jsonl(demo_data_path())[:2])


def test_help_lists_every_registered_spec():
    from zoomvlm.policies import POLICY_SPECS
    from zoomvlm.targets import TARGET_SPECS

    out = subprocess.run(["zoomvlm", "eval", "--help"], capture_output=True, text=True, check=True).stdout
    for spec in [*POLICY_SPECS, *TARGET_SPECS]:
        assert f"  {spec} " in out, spec


def test_bad_arguments_fail_before_any_model_loads(monkeypatch, capsys, tmp_path):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("zoomvlm.targets.load_target", no_loading)
    monkeypatch.setattr("zoomvlm.policies.load_policy", no_loading)
    image = str(demo_data_path().parent / "images" / "sroie_014.jpg")
    for argv, message in [
        (["ask", image, "q?", "--policy", "zoom-everything"], "unknown policy 'zoom-everything'"),
        (["ask", image, "q?", "--target", "tesseract"], "unknown target 'tesseract'"),
        (["ask", image, "q?", "--budget", "huge"], "budget"),
        (["ask", str(tmp_path / "missing.jpg"), "q?"], "missing.jpg"),
        (
            ["eval", "--data", str(demo_data_path()), "--out", str(tmp_path / "r"), "--policy", "nope"],
            "unknown policy",
        ),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "run with -v for the traceback" in err, err


def test_verbose_shows_the_traceback(capsys):
    assert main(["-v", "ask", "x.jpg", "q?", "--policy", "nope"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "error:" in err
    assert main(["ask", "x.jpg", "q?", "--policy", "nope"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_ask_defaults_to_the_proposals_cropper():
    out = subprocess.run([sys.executable, "-m", "zoomvlm.cli", "ask", "--help"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert "Default: proposals" in " ".join(out.split())


def test_bad_numbers_and_metric_names_are_refused_when_parsed(tmp_path, capsys):
    import pytest

    data = str(demo_data_path())
    for argv, message in (
        (["eval", "--data", data, "--out", str(tmp_path / "o"), "--metric", "contain"], "invalid choice: 'contain'"),
        (["eval", "--data", data, "--out", str(tmp_path / "o"), "--batch-size", "0"], "expected an integer >= 1"),
        (["eval", "--data", data, "--out", str(tmp_path / "o"), "--batch-size", "-1"], "expected an integer >= 1"),
        (["demo", "--out", str(tmp_path / "d"), "--limit", "0"], "expected an integer >= 1"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()  # nothing written, no run to repair


def test_an_api_target_without_a_key_is_one_line_not_a_traceback(monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    image = demo_data_path().parent / "images" / "sroie_017.jpg"
    assert main(["ask", str(image), "total?", "--target", "openai:gpt-4.1-nano", "--policy", "none"]) == 2
    err = capsys.readouterr().err
    assert "OPENAI_API_KEY is not set" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_resume_that_drops_a_setting_or_changes_the_scoring_is_refused(tmp_path, capsys):
    """A setting the first invocation had and the resume leaves out (--rtr-reference) is a different run; so is an
    explicit --metric over the samples' own, and a crop-set policy at another high view."""
    data = tmp_path / "d.jsonl"
    lines = [json.loads(x) for x in demo_data_path().read_text().splitlines()[:2]]
    for x in lines:
        x["image"] = str(demo_data_path().parent / x["image"])
    data.write_text("".join(json.dumps({**x, "metric": "contains"}) + "\n" for x in lines))
    base = ["eval", "--data", str(data), "--policy", "none", "--no-progress", "--limit", "1"]
    assert main([*base, "--rtr-reference", "side:768", "--out", str(tmp_path / "r1")]) == 0
    capsys.readouterr()
    assert main([*base[:-1], "2", "--out", str(tmp_path / "r1")]) == 2
    assert "rtr_reference: was 'side:768', now None" in capsys.readouterr().err
    # an explicit --metric now scores every sample with it (a JSONL line's own metric used to win), and says so
    assert main([*base, "--out", str(tmp_path / "r2")]) == 0
    assert main([*base[:-1], "2", "--metric", "anls", "--out", str(tmp_path / "r2")]) == 2
    assert "metric_override: was None, now True" in capsys.readouterr().err
    assert main([*base, "--metric", "anls", "--out", str(tmp_path / "r3")]) == 0
    assert json.loads((tmp_path / "r3" / "results.jsonl").read_text())["metric"] == "anls"
    # an explicit metric equal to every line's own changes nothing: not recorded (the report marked it "forced")
    assert main([*base, "--metric", "contains", "--out", str(tmp_path / "r6")]) == 0
    run = json.loads((tmp_path / "r6" / "run.json").read_text())
    assert "metric_override" not in run
    run["metric_override"] = True  # as the rule before recorded it: that run still resumes with its command
    (tmp_path / "r6" / "run.json").write_text(json.dumps(run))
    assert main([*base[:-1], "2", "--metric", "contains", "--out", str(tmp_path / "r6")]) == 0
    # crop-set@HIGH is part of the policy's name unless it is the default anyway
    out = str(tmp_path / "r4")
    fixed = ["eval", "--data", str(data), "--no-progress", "--rtr-reference", "side:768", "--out", out]
    assert main([*fixed, "--policy", "crop-set-fixed:0,1@side:512", "--limit", "1"]) == 0
    capsys.readouterr()
    assert main([*fixed, "--policy", "crop-set-fixed:0,1", "--limit", "2"]) == 2
    assert "policy: was 'crop-set-fixed:0,1@side:512', now 'crop-set-fixed:0,1'" in capsys.readouterr().err
    assert main([*fixed[:-1], str(tmp_path / "r5"), "--policy", "crop-set-fixed:0,1@side:768", "--limit", "1"]) == 0
    assert main([*fixed[:-1], str(tmp_path / "r5"), "--policy", "crop-set-fixed:0,1", "--limit", "2"]) == 0
