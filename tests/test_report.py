"""zoomvlm report: the table's numbers, the plot, the gallery (escaped, side by side), and a real browser."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fakes import EchoTarget
from PIL import Image

from zoomvlm.cli.main import main
from zoomvlm.data.samples import load_jsonl
from zoomvlm.evaluation.report import Run, gallery_rows, load_run, markdown_table, pareto_front, write_report
from zoomvlm.evaluation.run import Shard, run_eval
from zoomvlm.policies import load_policy

BLUE = (0, 0, 255)
EVIL = '<script>alert("x")</script> & <b>co</b>'


@pytest.fixture
def dataset(tmp_path):
    """6 questions on 2 solid blue images, with evidence boxes; the first question carries HTML."""
    (tmp_path / "images").mkdir()
    for k in range(2):
        Image.new("RGB", (300, 600), BLUE).save(tmp_path / "images" / f"r{k}.png")
    lines = []
    for i in range(6):
        question = EVIL if i == 0 else f"question {i}?"
        lines.append({"id": f"r{i % 2}_q{i}", "image": f"images/r{i % 2}.png", "width": 300, "height": 600,
                      "question": question, "answers": [f"ans{i}"],
                      "evidence_boxes": [[30, 60, 120, 90]]})  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _run(dataset, out, policy, right, shard=None):
    samples = load_jsonl(dataset)
    answers = {s.question: s.answers[0] for i, s in enumerate(samples) if i in right}
    config = {"data": str(dataset.resolve()), "target": "echo", "policy": policy, "crop_budget": "None",
              "metric": "contains"}  # fmt: skip
    run_eval(samples, load_policy(policy), EchoTarget(answers), out, config=config, progress=False, shard=shard)
    return out


@pytest.fixture
def two_runs(tmp_path, dataset):
    a = _run(dataset, tmp_path / "runs" / "none", "none", right={0, 1, 2})
    b = _run(dataset, tmp_path / "runs" / "center", "center", right={0, 3, 4, 5})
    return [a, b]


def test_pareto_front():
    assert pareto_front([(0.1, 0.5), (0.2, 0.4), (0.3, 0.9), (1.0, 0.9)]) == [0, 2]
    assert pareto_front([(0.5, 0.5), (0.5, 0.5), (0.1, 0.2)]) == [2, 0, 1]  # identical points both stay
    assert pareto_front([(1.0, 1.0), (0.5, 0.5), (0.2, 0.9)]) == [2, 0]
    assert pareto_front([]) == []


def _fake_run(label, scores, bench="b"):
    records = [{"id": f"q{i}", "score": s} for i, s in enumerate(scores)]
    return Run(Path(label), label, {"data": bench}, records)


def test_runs_measured_against_other_references_or_units_never_share_a_pareto_front(tmp_path):
    from zoomvlm.evaluation.report import Run, _rtr_axis_label, rtr_groups

    def run(name, reference, unit):
        config = {"data": "receipts.jsonl", **({"rtr_reference": reference} if reference else {})}
        record = {"id": "a", "score": 1.0, "rtr": 0.4, "rtr_unit": unit}
        return Run(tmp_path / name, name, config, [record])

    runs = [run("crop-set", "side:768", "pixels"), run("center", None, "pixels"), run("hf", None, "tokens"),
            run("none", None, "pixels")]  # fmt: skip
    groups = rtr_groups(runs)
    assert list(groups) == [("receipts.jsonl", "side:768", "pixels"), ("receipts.jsonl", "native", "pixels"),
                            ("receipts.jsonl", "native", "tokens")]  # fmt: skip
    assert [r.label for r in groups[("receipts.jsonl", "native", "pixels")]] == ["center", "none"]
    assert "see the legend" in _rtr_axis_label(list(groups))
    assert _rtr_axis_label([("b", "native", "pixels")]) == "mean RTR (pixels processed / native pixels)"
    assert _rtr_axis_label([("b", "side:768", "pixels")]) == "mean RTR (pixels processed / whole image at side:768)"
    # the table says what each RTR divides by and counts (0.4 against a 768 px view is not 0.4 of the native image)
    from zoomvlm.evaluation.report import markdown_table

    for r in runs:
        r.records[0].update(policy_seconds=0.0, target_seconds=0.1)
    rows = {_cells(line)[1]: _cells(line) for line in markdown_table(runs).splitlines()[2:]}
    vs = _cells(markdown_table(runs).splitlines()[0]).index("RTR vs")
    assert [rows[n][vs] for n in ("crop-set", "center", "hf")] == ["side:768 (pixels)", "native (pixels)",
                                                                  "native (tokens)"]  # fmt: skip


def test_gallery_rows_mix_right_and_wrong_deterministically():
    scores = [1.0] * 3 + [0.0] * 10
    ((bench, ids),) = gallery_rows([_fake_run("a", scores)], per_run=4)
    picked = [scores[int(i[1:])] for i in ids]
    assert bench == "b" and len(ids) == 4 and picked.count(1.0) == 2
    assert gallery_rows([_fake_run("a", scores)], per_run=4) == [(bench, ids)]
    one_right = [1.0] + [0.0] * 10
    ((_, ids),) = gallery_rows([_fake_run("a", one_right)], per_run=4)
    assert "q0" in ids and len(ids) == 4  # the only right answer, filled up with wrong ones
    all_right = [1.0] * 6
    assert len(gallery_rows([_fake_run("a", all_right)], per_run=4)[0][1]) == 4
    # two runs of one benchmark share the row list; other benchmarks get their own
    rows = gallery_rows([_fake_run("a", scores), _fake_run("b", scores[::-1]), _fake_run("c", scores, "x")], 4)
    assert [b for b, _ in rows] == ["b", "x"] and 4 <= len(rows[0][1]) <= 8


def test_runs_on_two_splits_or_under_two_metrics_are_never_one_benchmark(tmp_path):
    """chartqa ids are row numbers: a val and a test run share ids, not questions; accuracies under two metrics
    are not one scale."""
    from zoomvlm.evaluation.report import Run, markdown_table, rtr_groups

    def run(name, split, metric="relaxed_accuracy", data="chartqa"):
        config = {"data": data, "metric": metric, **({"split": split} if split else {})}
        return Run(tmp_path / name, name, config, [{"id": "0", "score": 1.0, "rtr": 0.1, "policy_seconds": 0.0,
                                                    "target_seconds": 0.1}])  # fmt: skip

    runs = [run("val", "val"), run("test", "test"), run("test-anls", "test", "anls")]
    forced = run("test-forced", "test")  # an explicit --metric overrode the samples' own: not the same scoring
    forced.config["metric_override"] = True
    assert [k[0] for k in rtr_groups([runs[1], forced])] == ["chartqa (test) · relaxed_accuracy",
                                                            "chartqa (test) · relaxed_accuracy (forced)"]  # fmt: skip
    assert [r.benchmark for r in runs] == ["chartqa (val)", "chartqa (test)", "chartqa (test)"]
    assert [b for b, _ in gallery_rows(runs, 2)] == ["chartqa (val)", "chartqa (test)"]
    assert [k[0] for k in rtr_groups(runs)] == ["chartqa (val)", "chartqa (test) · relaxed_accuracy",
                                                "chartqa (test) · anls"]  # fmt: skip
    assert "chartqa (test)" in markdown_table(runs)
    assert list(rtr_groups([run("a", None, data="r.jsonl")])) == [("r.jsonl", "native", "pixels")]
    with pytest.raises(ValueError, match="per_run must be >= 0"):
        gallery_rows(runs, -1)


def _cells(line: str) -> list[str]:
    """The cells of one markdown table row, stripped."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_report_table_plot_and_gallery(two_runs, tmp_path):
    out = tmp_path / "report"
    paths = write_report(two_runs, out, per_run=4)
    table = paths["table"].read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tmp") or "/data.jsonl" in line]
    assert len(rows) == 2
    none_row, center_row = (_cells(r) for r in rows)
    assert none_row[1:3] == ["none", "none"] and none_row[6:8] == ["6", "50.0"]  # n, accuracy (3 of 6 right)
    assert center_row[1:3] == ["center", "center"] and center_row[6:8] == ["6", "66.7"]
    s_center = load_run(two_runs[1]).stats()
    assert center_row[8] == f"{s_center['rtr']:.3f}" and center_row[-1] == "0.0"  # nothing cached
    assert "![accuracy vs RTR](accuracy_vs_rtr.png)" in table

    with Image.open(paths["plot"]) as img:
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 20
    assert (np.abs(pixels.astype(int) - (31, 119, 180)).sum(axis=1) < 30).sum() > 50  # the benchmark's points

    html = paths["gallery"].read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;co" in html
    blocks = html.split('<div class="q">')[1:]
    assert 4 <= len(blocks) <= 6
    for block in blocks:  # both runs shown side by side for every shared question
        assert block.count('<div class="run">') == 2
    assert "right" in html and "wrong" in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 2 * len(blocks) and all((out / s).is_file() for s in srcs)
    with Image.open(out / srcs[0]) as pic:  # the picture is the dataset image with boxes drawn on it
        colors = {c for _, c in pic.convert("RGB").getcolors(1 << 16)}
    assert any(abs(r) < 40 and abs(g) < 40 and b > 200 for r, g, b in colors)
    assert any(g > 120 and r < 80 and b < 120 for r, g, b in colors)  # green evidence box


def test_report_merges_shards_and_flags_missing_ones(dataset, tmp_path):
    run = _run(dataset, tmp_path / "sharded", "none", right={0}, shard=Shard(1, 2))
    table = markdown_table([load_run(run)])
    assert re.search(r"\|\s*3 \(shards 1/2\)\s*\|", table)
    _run(dataset, run, "none", right={0}, shard=Shard(0, 2))
    assert re.search(r"\|\s*6\s*\|\s*16\.7\s*\|", markdown_table([load_run(run)]))


def test_gallery_without_images_says_so(two_runs, tmp_path, dataset):
    shutil.rmtree(dataset.parent / "images")
    dataset.unlink()
    html = write_report(two_runs, tmp_path / "report", per_run=2)["gallery"].read_text()
    assert "images unavailable" in html and "dataset file not found" in html


def test_cli_report_and_errors(two_runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", *map(str, two_runs), "--out", str(out), "--per-run", "2"]) == 0
    assert re.search(r"\|\s*accuracy %\s*\|", capsys.readouterr().out)
    assert {p.name for p in out.iterdir()} >= {"report.md", "accuracy_vs_rtr.png", "gallery.html", "gallery"}
    assert main(["report", str(tmp_path), "--out", str(out)]) == 2
    assert "is not a run directory (no run.json)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused when parsed, before any run is read
        main(["report", *map(str, two_runs), "--out", str(out), "--per-run", "-1"])
    assert "--per-run: expected an integer >= 0, got '-1'" in capsys.readouterr().err


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium)")
def test_gallery_renders_in_headless_chromium(two_runs, tmp_path):
    gallery = write_report(two_runs, tmp_path / "report", per_run=2)["gallery"]
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
           "--window-size=1000,1400", gallery.resolve().as_uri()]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1000, 1400)
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 50, "blank page"
    # the pictures were loaded and drawn: a large area of the datasets' blue, and red crop outlines
    blue = (np.abs(pixels - BLUE).sum(axis=1) < 60).sum()
    red = (np.abs(pixels - (230, 40, 40)).sum(axis=1) < 60).sum()
    assert blue > 20_000 and red > 100, (blue, red)


def test_a_run_on_fewer_questions_is_drawn_apart_and_kept_off_the_front(tmp_path, monkeypatch):
    """`none` on 2 of the 6 questions `center` answered: its 100 % is over another set, so it may not make the
    front that `center` is on (it did, and `center` looked dominated)."""
    from matplotlib.axes import Axes

    from zoomvlm.evaluation.report import Run, plot_accuracy_vs_rtr

    def run(name, n, score, rtr):
        records = [{"id": str(i), "score": score, "rtr": rtr, "policy_seconds": 0.0, "target_seconds": 0.1}
                   for i in range(n)]  # fmt: skip
        return Run(tmp_path / name, name, {"data": "d.jsonl"}, records)

    steps, notes = [], []
    real_step, real_annotate = Axes.step, Axes.annotate
    monkeypatch.setattr(Axes, "step", lambda self, x, y, *a, **k: steps.append((list(x), list(y))) or real_step(
        self, x, y, *a, **k))  # fmt: skip
    monkeypatch.setattr(Axes, "annotate", lambda self, text, *a, **k: notes.append(text) or real_annotate(
        self, text, *a, **k))  # fmt: skip
    plot_accuracy_vs_rtr([run("center", 6, 0.5, 0.02), run("none", 2, 1.0, 0.01)], tmp_path / "p.png")
    assert steps == [([0.02, 0.02], [50.0, 50.0])]  # the front is center's alone
    assert notes == ["center", "none (2/6 q)"]
