"""Benchmark loaders on small local copies of each hub dataset, in its real schema, built here.

Each fixture is laid out like the hub repository (parquet files whose schema carries the ``datasets``
features, plus the README ``configs:`` block naming config and split), so ``datasets.load_dataset`` reads it
with the same config and split arguments as the hub.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from zoomvlm.data.benchmarks import BENCHMARKS, HubImage, parse_inline_options, parse_option_lines  # noqa: E402
from zoomvlm.data.samples import DatasetError, Sample, UnreadableImageError, load_samples  # noqa: E402

V, L, IMG = datasets.Value, datasets.Sequence, datasets.Image
SIZES = [(64, 48), (30, 90), (50, 50)]
COLORS = ["red", "lime", "blue"]
RGB = {"red": (255, 0, 0), "lime": (0, 255, 0), "blue": (0, 0, 255)}


def _png(i: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", SIZES[i], COLORS[i]).save(buf, format=fmt)
    return buf.getvalue()


def _img(i: int) -> dict:
    return {"bytes": _png(i), "path": None}


# Rows in each dataset's schema (column names and types as on the hub / in lmms-eval's utils.py).
SCHEMAS = {
    "textvqa": (
        {"image_id": V("string"), "question_id": V("int32"), "question": V("string"),
         "question_tokens": L(V("string")), "image": IMG(), "image_width": V("int32"), "image_height": V("int32"),
         "flickr_original_url": V("string"), "flickr_300k_url": V("string"), "answers": L(V("string")),
         "image_classes": L(V("string")), "set_name": V("string"), "ocr_tokens": L(V("string"))},
        lambda i: {"image_id": f"img{i}", "question_id": 34602 + i, "question": f"what brand is shown {i}?",
                   "question_tokens": ["what"], "image": _img(i), "image_width": SIZES[i][0],
                   "image_height": SIZES[i][1], "flickr_original_url": "", "flickr_300k_url": "",
                   "answers": ["nous les gosses"] * 7 + ["dakota"] * 3, "image_classes": ["Billboard"],
                   "set_name": "val", "ocr_tokens": ["nous"]},
    ),
    "docvqa": (
        {"questionId": V("string"), "question": V("string"), "question_types": L(V("string")), "image": IMG(),
         "docId": V("int32"), "ucsf_document_id": V("string"), "ucsf_document_page_no": V("string"),
         "answers": L(V("string")), "data_split": V("string")},
        lambda i: {"questionId": str(49153 + i), "question": "What is the ‘actual’ value per 1000?",
                   "question_types": ["table/list"], "image": _img(i), "docId": 14465 + i,
                   "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81", "answers": ["0.28", "$0.28"],
                   "data_split": "val"},
    ),
    "chartqa": (
        {"type": V("string"), "question": V("string"), "answer": V("string"), "image": IMG()},
        lambda i: {"type": ["human_test", "augmented_test", "human_test"][i], "question": "What is the peak?",
                   "answer": "45", "image": _img(i)},
    ),
    "ocrbench": (
        {"dataset": V("string"), "question": V("string"), "question_type": V("string"),
         "answer": L(V("string")), "image": IMG()},
        lambda i: {"dataset": ["IIIT5K", "HME100k", "docVQA"][i], "question": " what is written in the image? ",
                   "question_type": ["Regular Text Recognition", "Handwritten Mathematical Expression Recognition",
                                     "Doc-oriented VQA"][i], "answer": ["COFFEE", "Coffee"], "image": _img(i)},
    ),
    "vstar": (
        {"image": IMG(), "text": V("string"), "label": V("string"), "question_id": V("int64"),
         "category": V("string")},
        lambda i: {"image": _img(i), "question_id": i, "label": "B",
                   "category": ["direct_attributes", "relative_position", "direct_attributes"][i],
                   "text": ["What is the color of the glove? (A) red (B) white (C) black (D) green",
                            "Is the cup on the left or right of the laptop?\n(A) left\n(B) right\nAnswer with the "
                            "option's letter from the given choices directly.",
                            "What is the material of the (B) stool? (A) wood (B) metal (C) plastic (D) stone"][i]},
    ),
    "hrbench4k": (
        {"index": V("int64"), "question": V("string"), "answer": V("string"), "category": V("string"),
         "A": V("string"), "B": V("string"), "C": V("string"), "D": V("string"), "cycle_category": V("string"),
         "image": V("string")},
        lambda i: {"index": 100 + i, "question": "What is the number on the bus? ", "answer": "C",
                   "category": ["single", "cross", "single"][i], "A": "12", "B": "21", "C": "112", "D": None,
                   "cycle_category": f"cycle_{i}", "image": base64.b64encode(_png(i, "JPEG")).decode()},
    ),
    "pope": (
        {"id": V("string"), "question_id": V("string"), "question": V("string"), "answer": V("string"),
         "image_source": V("string"), "image": IMG(), "category": V("string")},
        lambda i: {"id": str(i), "question_id": str(1 + i % 2), "question": "Is there a dog in the image?",
                   "answer": ["yes", "no", "No"][i], "image_source": "COCO_val2014_000000310196",
                   "image": _img(i), "category": ["adversarial", "popular", "random"][i]},
    ),
    "realworldqa": (
        {"image": IMG(), "question": V("string"), "answer": V("string")},
        lambda i: {"image": _img(i), "answer": ["B", "0", "A"][i],
                   "question": ["In which direction is the car facing?\nA. left\nB. right\nC. towards us\n"
                                "Please answer directly with only the letter of the correct option and nothing "
                                "else.", "How many cyclists are there?\nPlease answer directly with a single word "
                                "or number.", "Is it safe to cross?\nA. yes\nB. no\nPlease answer directly with "
                                "only the letter of the correct option and nothing else."][i]},
    ),
}  # fmt: skip
SCHEMAS["hrbench8k"] = SCHEMAS["hrbench4k"]


def write_hub_copy(root, name: str, n: int = 3, rows=None, features=None):
    """A local copy of benchmark ``name``'s hub repository with ``n`` rows (or ``rows``); returns its folder."""
    bench = BENCHMARKS[name]
    features, make = (features or SCHEMAS[name][0]), SCHEMAS[name][1]
    rows = rows if rows is not None else [make(i) for i in range(n)]
    table = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    folder = root / bench.hub_id
    config = bench.config or "default"
    (folder / config).mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(folder / config / f"{bench.split}-00000-of-00001.parquet"))
    (folder / "README.md").write_text(
        f"---\nconfigs:\n- config_name: {config}\n  data_files:\n  - split: {bench.split}\n"
        f"    path: {config}/{bench.split}-*\n---\n"
    )
    return folder


@pytest.fixture
def load(tmp_path):
    def _load(name, n=3, rows=None, features=None, **kwargs):
        folder = write_hub_copy(tmp_path / "hub", name, n, rows, features)
        return load_samples(name, data_dir=folder, cache_dir=tmp_path / "cache", **kwargs)

    return _load


def _check_images(samples):
    for i, s in enumerate(samples):
        assert isinstance(s.image, HubImage)  # a lazy reference, not pixels
        assert (s.width, s.height) == SIZES[i]
        img = s.load_image()
        assert img.mode == "RGB" and img.size == SIZES[i]
        got = img.getpixel((SIZES[i][0] // 2, SIZES[i][1] // 2))
        assert all(abs(a - b) < 8 for a, b in zip(got, RGB[COLORS[i]], strict=True))  # JPEG: nearly exact


def test_textvqa(load):
    samples = load("textvqa")
    _check_images(samples)
    s = samples[0]
    assert s.id == "textvqa_34602" and s.question == "what brand is shown 0?"  # verbatim: no .capitalize()
    assert len(s.answers) == 10 and s.metric == "vqa_accuracy"


def test_docvqa(load):
    samples = load("docvqa")
    _check_images(samples)
    assert [s.id for s in samples] == ["docvqa_49153", "docvqa_49154", "docvqa_49155"]
    assert samples[0].answers == ("0.28", "$0.28") and samples[0].metric == "anls"


def test_chartqa(load):
    samples = load("chartqa")
    _check_images(samples)
    assert [s.field for s in samples] == ["human_test", "augmented_test", "human_test"]
    assert samples[0].answers == ("45",) and samples[0].metric == "relaxed_accuracy"


def test_ocrbench_uses_the_handwritten_maths_rule_for_hme100k(load):
    samples = load("ocrbench")
    _check_images(samples)
    assert [s.metric for s in samples] == ["ocrbench", "ocrbench_hme", "ocrbench"]
    assert samples[0].question == "what is written in the image?"
    assert samples[1].field == "Handwritten Mathematical Expression Recognition"
    assert samples[0].answers == ("COFFEE", "Coffee")


def test_vstar_options_in_question_and_meta(load):
    samples = load("vstar")
    _check_images(samples)
    s0, s1, s2 = samples
    assert s0.question == (
        "What is the color of the glove?\nA. red\nB. white\nC. black\nD. green\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert s0.meta["options"] == {"A": "red", "B": "white", "C": "black", "D": "green"}
    assert s1.meta["options"] == {"A": "left", "B": "right"}  # trailing instruction not part of option B
    assert s2.meta["options"]["A"] == "wood"  # a "(B)" inside the stem before "(A)" is not an option
    assert s2.question.startswith("What is the material of the (B) stool?\nA. wood")
    assert all(s.answers == ("B",) and s.metric == "multiple_choice" for s in samples)
    assert s1.field == "relative_position"


@pytest.mark.parametrize("name", ["hrbench4k", "hrbench8k"])
def test_hrbench_base64_images_and_options(load, name):
    samples = load(name)
    _check_images(samples)
    s = samples[0]
    assert s.id == f"{name}_100" and s.answers == ("C",) and s.field == "single"
    assert s.meta["options"] == {"A": "12", "B": "21", "C": "112"}  # the missing D is not an option
    assert s.question == "What is the number on the bus?\nA. 12\nB. 21\nC. 112\nAnswer the option letter directly."
    assert s.meta["cycle_category"] == "cycle_0"


def test_pope(load):
    samples = load("pope")
    _check_images(samples)
    assert [s.answers for s in samples] == [("yes",), ("no",), ("no",)]
    assert len({s.id for s in samples}) == 3  # question_id repeats across categories; ids must not
    assert samples[2].field == "random" and samples[0].metric == "pope"


def test_realworldqa(load):
    samples = load("realworldqa")
    _check_images(samples)
    assert samples[0].meta["options"] == {"A": "left", "B": "right", "C": "towards us"}
    assert samples[0].question.startswith("In which direction is the car facing?\nA. left")
    assert samples[1].meta["options"] == {} and samples[1].answers == ("0",)  # a free-form question


def test_every_benchmark_has_a_fixture_and_a_metric():
    from zoomvlm.core.metrics import METRICS

    assert set(SCHEMAS) == set(BENCHMARKS)
    assert all(b.metric in METRICS for b in BENCHMARKS.values())


def test_images_are_not_decoded_at_load(load, monkeypatch):
    from PIL import ImageFile

    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real(self))
    samples = load("docvqa")
    assert decoded == []  # sizes came from the headers only
    samples[1].load_image()
    assert decoded  # decoded on demand


def test_limit_split_and_env_dir(tmp_path, monkeypatch):
    write_hub_copy(tmp_path / "hub", "chartqa")
    monkeypatch.setenv("ZOOMVLM_DATA_DIR", str(tmp_path / "hub"))  # <root>/<hub id>, as on the hub
    samples = load_samples("chartqa", limit=2, cache_dir=tmp_path / "cache")
    assert [s.id for s in samples] == ["chartqa_0", "chartqa_1"]
    with pytest.raises(DatasetError, match="split=validation"):
        load_samples("chartqa", split="validation", cache_dir=tmp_path / "cache")


def test_offline_hub_without_local_copy_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ZOOMVLM_DATA_DIR", raising=False)
    with pytest.raises(DatasetError, match="cannot load lmms-lab/POPE.*offline\\? pass data_dir="):
        load_samples("pope", cache_dir=tmp_path / "cache")
    monkeypatch.setenv("ZOOMVLM_DATA_DIR", str(tmp_path / "data"))  # set, but the copy is not under it
    with pytest.raises(DatasetError, match=f"is {tmp_path / 'data'}, but {tmp_path / 'data' / 'lmms-lab/POPE'} does"):
        load_samples("pope", cache_dir=tmp_path / "cache")


def test_schema_changes_fail_with_the_missing_column(load):
    features, make = SCHEMAS["chartqa"]
    renamed = {k: v for k, v in features.items() if k != "answer"} | {"label": V("string")}
    rows = [{k: v for k, v in make(i).items() if k != "answer"} | {"label": "45"} for i in range(2)]
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['answer'\]"):
        load("chartqa", rows=rows, features=renamed)


def test_bad_rows_are_named(load):
    _, make = SCHEMAS["pope"]
    with pytest.raises(DatasetError, match="pope row 0: answer must be yes or no"):
        load("pope", rows=[make(0) | {"answer": "maybe"}])
    _, make = SCHEMAS["vstar"]
    with pytest.raises(DatasetError, match=r"vstar row 0: answer 'E' is not one of the options"):
        load("vstar", rows=[make(0) | {"label": "E"}])
    _, make = SCHEMAS["textvqa"]
    with pytest.raises(DatasetError, match="id 'textvqa_34602' repeats"):
        load("textvqa", rows=[make(0), make(0)])


def test_unknown_specs_and_jsonl_dispatch(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'textvqa2'.*textvqa, docvqa"):
        load_samples("textvqa2")
    Image.new("RGB", (10, 20)).save(tmp_path / "a.png")
    row = {"id": "a", "image": "a.png", "width": 10, "height": 20, "question": "q?", "answers": ["x"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row | {"id": "b"}) + "\n")
    samples = load_samples(tmp_path / "d.jsonl", limit=1)
    assert [s.id for s in samples] == ["a"] and samples[0].image == tmp_path / "a.png"  # JSONL unchanged: a Path
    with pytest.raises(DatasetError, match="a JSONL dataset has no splits"):
        load_samples(tmp_path / "d.jsonl", split="test")
    with pytest.raises(DatasetError, match="limit must be a positive"):
        load_samples(tmp_path / "d.jsonl", limit=0)


def test_lazy_sample_image_errors_are_unreadable_image_errors():
    def broken():
        return Image.open(io.BytesIO(b"not an image"))

    sample = Sample("s", broken, "q", ("a",), 10, 10)
    with pytest.raises(UnreadableImageError, match="cannot read image of sample 's'"):
        sample.load_image()
    ok = Sample("t", lambda: Image.new("L", (4, 3)), "q", ("a",), 4, 3)
    assert ok.load_image().mode == "RGB"


def test_option_parsers():
    assert parse_inline_options("Q? (A) x y (B) z") == ("Q?", {"A": "x y", "B": "z"})
    assert parse_inline_options("No options here") == ("No options here", {})
    assert parse_option_lines("Q?\nA. one\nB.  two \nC.three") == {"A": "one", "B": "two"}  # "C.three": no space


def test_run_eval_scores_benchmark_samples_with_their_own_metrics(load, tmp_path):
    from fakes import EchoTarget

    from zoomvlm.evaluation.run import run_eval
    from zoomvlm.policies import load_policy

    vstar, pope = load("vstar"), load("pope")
    answers = {vstar[0].question: "It is white.", vstar[1].question: "Answer: B", pope[0].question: "Yes."}
    summary = run_eval(vstar[:2] + pope[:1], load_policy("none"), EchoTarget(answers), tmp_path / "run",
                       metric="anls", progress=False)  # fmt: skip
    records = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "run" / "results.jsonl").open()}
    assert records["vstar_0"]["metric"] == "multiple_choice" and records["vstar_0"]["score"] == 1.0  # option text
    assert records["vstar_1"]["score"] == 1.0  # "Answer: B" is B
    assert records["pope_0"]["metric"] == "pope" and records["pope_0"]["score"] == 1.0
    assert set(records["pope_0"]["metrics"]) == {"contains", "anls", "exact", "relaxed_accuracy", "vqa_accuracy",
                                                 "pope"}  # fmt: skip
    assert summary["accuracy"] == 1.0 and summary["pope_f1"] == 1.0 and summary["pope_yes_ratio"] == 1.0


def test_cli_eval_on_a_benchmark_by_name(tmp_path, monkeypatch, capsys):
    from zoomvlm.cli.main import main

    write_hub_copy(tmp_path / "hub", "pope")
    monkeypatch.setenv("ZOOMVLM_DATA_DIR", str(tmp_path / "hub"))
    out = tmp_path / "run"
    args = ["eval", "--data", "pope", "--split", "test", "--target", "ocr", "--limit", "2", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["data"] == "pope" and run["split"] == "test" and run["metric"] == "pope"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and "pope_f1" in summary
    assert "benchmark: pope_accuracy" in capsys.readouterr().out
    # an explicit --metric on a benchmark overrode its samples before run.json said so: no new key, so a run made
    # either way (and before) resumes
    assert main([*args, "--metric", "pope"]) == 0 and "metric_override" not in json.loads(
        (out / "run.json").read_text()
    )
    capsys.readouterr()
    assert main(["eval", "--data", "pope", "--split", "nosuchsplit", "--out", str(tmp_path / "r2")]) == 2
    assert "cannot load" in capsys.readouterr().err
    # OCRBench scores its handwritten-maths rows by their own rule; an explicit --metric ocrbench forces the plain
    # one on them under the same name: run.json says so from the first run, whatever prefix --limit loaded (the
    # first row is not HME), and an auto run does not resume into it
    write_hub_copy(tmp_path / "hub", "ocrbench")
    ocr = ["eval", "--data", "ocrbench", "--target", "ocr", "--out", str(tmp_path / "ocr"), "--no-progress"]
    assert main([*ocr, "--limit", "1", "--metric", "ocrbench"]) == 0
    assert json.loads((tmp_path / "ocr" / "run.json").read_text())["metric_override"] is True
    assert main([*ocr, "--limit", "2", "--metric", "ocrbench"]) == 0  # extended: the same scoring
    capsys.readouterr()
    assert main([*ocr, "--limit", "2"]) == 2  # auto: HME rows by their own rule, another run
    assert "metric_override: was True, now None" in capsys.readouterr().err


def _sideways(fmt: str) -> bytes:
    """An 80x40 image stored a quarter turn from how it is seen (EXIF orientation 6), red on the stored left (the
    top once turned upright), in ``fmt`` (``PNG-raw``: ImageMagick's "Raw profile type exif" text chunk)."""
    from PIL import PngImagePlugin

    raw = Image.new("RGB", (80, 40), "white")
    raw.paste((255, 0, 0), (0, 0, 20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    if fmt == "PNG-raw":
        info = PngImagePlugin.PngInfo()
        data = exif.tobytes()
        info.add_text("Raw profile type exif", f"\nexif\n{len(data):8d}\n{data.hex()}\n")
        raw.save(buf, format="PNG", pnginfo=info)
    else:
        raw.save(buf, format=fmt, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "PNG-raw", "TIFF", "WEBP"])
def test_a_benchmark_photo_stored_sideways_loads_upright_as_from_a_file(load, fmt):
    """A hub image with an EXIF orientation tag: the lazy sample's size (from the header) and pixels are the upright
    frame, as ``load_image`` on a file, ``zoomvlm serve`` and ``datasets`` itself show it (TIFF: Pillow reports the
    turned size itself, which must not be turned again)."""
    rows = [{**SCHEMAS["pope"][1](0), "image": {"bytes": _sideways(fmt), "path": None}}]
    (sample,) = load("pope", rows=rows)
    image = sample.load_image()
    assert (sample.width, sample.height) == image.size == (40, 80)
    assert image.getpixel((20, 3))[0] > 200 and image.getpixel((20, 3))[1] < 80  # red at the top


def test_a_benchmark_image_over_pils_pixel_guard_is_a_dataset_error(load, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x48 is now more than twice the guard: a "bomb"
    with pytest.raises(DatasetError, match="unreadable image.*decompression bomb"):
        load("pope")
