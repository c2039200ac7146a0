"""The learned-cropper policy loads a save_pretrained checkpoint and counts invalid boxes."""

import pytest
import tiny_models as tiny

import zoomvlm.targets.hf as hf_module
from zoomvlm.core.geometry import Box
from zoomvlm.policies import load_policy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_vlms):
    model, processor = tiny_vlms["smolvlm"]
    return tiny.save_tiny(model, processor, tmp_path_factory.mktemp("cropper"))


def test_loads_checkpoint_and_falls_back_on_invalid_output(checkpoint, noise_images):
    policy = load_policy(f"vlm:{checkpoint}@free", max_new_tokens=8)  # free: constrained decoding is the default
    proposals = policy.propose(noise_images, ["What is the total?", "Who issued it?"])
    assert len(proposals) == 2
    # a random-weight model writes garbage: whole image, raw text and the reason kept, and counted
    for p in proposals:
        assert p.boxes == (Box.full(),) and p.error and p.raw is not None
    assert (policy.n_invalid, policy.n_total) == (2, 2)


def test_valid_boxes_are_parsed(checkpoint, noise_images, monkeypatch):
    policy = load_policy(f"vlm:{checkpoint}")
    monkeypatch.setattr(
        hf_module, "generate_texts", lambda *a, **k: (["[10, 20, 60, 80].", "[50, 50, 40, 90]."], {}, [9, 9])
    )
    good, bad = policy.propose(noise_images, ["q1", "q2"])
    assert good.boxes == (Box(0.1, 0.2, 0.6, 0.8),) and good.error is None
    assert bad.boxes == (Box.full(),) and bad.error == "x2 (40) must be > x1 (50)"
    assert policy.n_invalid == 1


def test_unknown_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        load_policy(f"vlm:{tmp_path / 'nope'}")
    # a relative run folder is not a hub id either (it reached the hub client: "Repo id must be in the form ...")
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found: runs/tiny_sft_augment/final"):
        load_policy("vlm:runs/tiny_sft_augment/final")
