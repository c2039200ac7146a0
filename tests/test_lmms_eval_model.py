"""The lmms-eval model class: against lmms-eval's documented request shapes always, and through lmms-eval's
own Instance and model registry when lmms-eval is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from fakes import EchoTarget
from PIL import Image

from zoomvlm.integrations.lmms_eval import ZoomVLM


class FakeInstance:
    """lmms-eval's Instance as its docs describe it: ``.args`` is the request tuple."""

    def __init__(self, *args):
        self.args = args


DOCS = {"mytask": {"test": {0: {"img": Image.new("RGB", (400, 200), "white"), "answer": "yes"},
                            1: {"img": Image.new("RGB", (100, 300), "black"), "answer": "no"}}}}  # fmt: skip


def _visual(doc):
    return [doc["img"]]


def _model(**kwargs):
    target = EchoTarget({"Is it white? ASSISTANT:": "Yes. ASSISTANT: extra", "Is it black?": "No"})
    model = ZoomVLM(target=target, policy="center", **kwargs)
    model.task_dict = DOCS  # lmms-eval sets this from the tasks it runs
    return model, target


def test_generate_until_with_documented_args():
    model, target = _model(batch_size=2)
    reqs = [
        FakeInstance("Is it white? ASSISTANT:", {"until": ["ASSISTANT:"]}, _visual, 0, "mytask", "test"),
        FakeInstance("Is it black?", {"until": "\n", "max_new_tokens": 8}, _visual, 1, "mytask", "test"),
    ]
    out = model.generate_until(reqs)
    texts = [o if isinstance(o, str) else o.text for o in out]
    assert texts == ["Yes. ", "No"]  # cut at the first stop string
    assert target.calls == 2
    assert len(target.requests[0].images) == 2  # the center policy added a crop to the global view
    assert target.requests[0].question == "Is it white? ASSISTANT:"  # the task's context, verbatim
    assert target.requests[0].images[0].size == (400, 200)  # policy and target see the native image
    assert [u["rtr"] for u in model.usage] == pytest.approx(
        [sum(u["view_pixels"]) / n for u, n in zip(model.usage, (400 * 200, 100 * 300), strict=True)]
    )


def test_loglikelihood_with_documented_args():
    model, _ = _model()
    reqs = [
        FakeInstance("Is it white?", " yes", _visual, 0, "mytask", "test"),
        FakeInstance("Is it black?", lambda doc: doc["answer"], _visual, 1, "mytask", "test"),  # doc_to_target
    ]
    # EchoTarget scores an answer as -len(answer): the continuation (and doc_to_target's "no") reach the target
    assert model.loglikelihood(reqs) == [(-4.0, False), (-2.0, False)]
    greedy, target = _model(greedy_check="true")
    black = [FakeInstance("Is it black?", " No", _visual, 1, "mytask", "test"), reqs[1]]
    # the target's greedy answer to "Is it black?" is "No": " No" is it (spaces aside), "no" is not
    assert greedy.loglikelihood(black) == [(-3.0, True), (-2.0, False)]
    assert [r.answer for r in target.requests] == [" No", "no"]  # generate() saw the scored requests


def test_bad_requests_and_args_are_clear():
    model, _ = _model()
    docs = {"t": {"s": {0: {"text": "only text"}}}}
    model.task_dict = docs
    with pytest.raises(ValueError, match="t/s doc 0: no image"):
        model.generate_until([FakeInstance("q", {}, lambda d: [], 0, "t", "s")])
    with pytest.raises(NotImplementedError):
        model.generate_until_multi_round([])
    with pytest.raises(ValueError, match="batch_size"):
        ZoomVLM(target=EchoTarget(), batch_size=0)
    with pytest.raises(ValueError, match="unknown policy"):
        ZoomVLM(target=EchoTarget(), policy="zoom-everything")
    # lmms-eval splits model_args on commas: a policy option after a comma must not be dropped silently
    with pytest.raises(ValueError, match="separate a policy's options with @"):
        ZoomVLM(target=EchoTarget(), policy="vlm@boxes=2", t=0.7)
    ZoomVLM(target=EchoTarget(), policy="none", device="cuda", max_batch_size=8)  # lmms-eval's own flags
    assert ZoomVLM(target=EchoTarget(), policy="crop-set-fixed:0+1").policy.keys == ["0", "1"]


def test_the_plugin_counts_rtr_as_zoomvlm_eval_does(tiny_vlms):
    """An hf: target counts RTR in its own visual tokens: `full` is 1.0 there, not the pixel share of its view."""
    from zoomvlm.targets.hf import HFTarget

    model, processor = tiny_vlms["llava"]
    plugin = ZoomVLM(target=HFTarget("tiny-llava", model=model, processor=processor, max_new_tokens=1), policy="full")
    plugin.task_dict = DOCS
    plugin.generate_until([FakeInstance("Is it white?", {"until": []}, _visual, 0, "mytask", "test")])
    assert plugin.usage[0]["rtr"] == pytest.approx(1.0) and plugin.usage[0]["rtr_unit"] == "tokens"


def test_the_plugin_counts_a_crop_set_policys_rtr_against_its_high_view():
    """AwaRes counts RTR against the high view (zoomvlm eval does the same by default): the low view alone of a
    768 px-high crop set is ~1/4 of it, not its share of the native image."""
    from zoomvlm.core.geometry import Budget
    from zoomvlm.core.pipeline import run_batch
    from zoomvlm.data.samples import Sample

    docs = {"t": {"s": {0: {"img": Image.new("RGB", (1600, 1200), "white")}}}}
    rtrs = []
    for kwargs in ({}, {"rtr_reference": "native"}):
        plugin = ZoomVLM(target=EchoTarget(), policy="crop-set-fixed:none", **kwargs)
        plugin.task_dict = docs
        plugin.generate_until([FakeInstance("q", {"until": []}, _visual, 0, "t", "s")])
        rtrs.append(plugin.usage[0]["rtr"])
    assert rtrs[0] == pytest.approx(0.25, abs=0.01)  # low view 384 x 288 of the 768 x 576 high view
    assert rtrs[1] == pytest.approx(384 * 288 / (1600 * 1200), rel=0.01)
    # the same number zoomvlm eval's pipeline gives with the policy's high view as the reference
    docs["t"]["s"][0]["img"].save("/tmp/_plugin_rtr.png")
    sample = Sample("x", Path("/tmp/_plugin_rtr.png"), "q", ("a",), 1600, 1200)
    policy = ZoomVLM(target=EchoTarget(), policy="crop-set-fixed:none").policy
    (record,) = run_batch([sample], policy, EchoTarget(), rtr_reference=Budget.parse("side:768"))
    assert record.rtr == pytest.approx(rtrs[0])


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed here")
def test_through_lmms_eval(demo_samples):
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from zoomvlm.integrations.lmms_eval import manifest

    registry = ModelRegistryV2()
    registry.register_manifest(manifest())
    cls = registry.get_model_class("zoomvlm")  # lmms-eval's own validation: an lmms subclass, simple
    assert cls is ZoomVLM and issubclass(cls, lmms)
    model = cls.create_from_arg_string("target=ocr,policy=full,batch_size=1")  # lmms-eval's model_args parser
    sample = next(s for s in demo_samples if s.field == "total")
    model.task_dict = {"receipts": {"val": {0: {"image": sample.load_image()}}}}
    inst = Instance("generate_until", (sample.question, {"until": []}, lambda d: [d["image"]], 0, "receipts", "val"),
                    idx=0, metadata={"task": "receipts", "doc_id": 0, "repeats": 1})  # fmt: skip
    (result,) = model.generate_until([inst])
    assert isinstance(result, GenerationResult)  # lmms-eval's typed result
    assert sample.answers[0] in result.text.replace(" ", "")  # read at native resolution
    assert model.usage[0]["rtr"] == pytest.approx(1.0)


def test_generate_until_with_self_zoom(tiny_vlms):
    """--policy self-zoom through the plugin: the hf: target answers over its own turns (no crop requests made by
    the plugin), one answer per request."""
    from zoomvlm.targets.hf import HFTarget

    model, processor = tiny_vlms["qwen2_5_vl"]
    target = HFTarget("tiny-qwen", model=model, processor=processor, max_new_tokens=3)
    plugin = ZoomVLM(target=target, policy="self-zoom:zoomvlm@side:336")
    plugin.task_dict = DOCS
    reqs = [FakeInstance("Is it white?", {"until": []}, _visual, i, "mytask", "test") for i in (0, 1)]
    out = plugin.generate_until(reqs)
    assert len(out) == 2 and all(isinstance(o if isinstance(o, str) else o.text, str) for o in out)
    assert all(u["completion_tokens"] > 0 for u in plugin.usage)
