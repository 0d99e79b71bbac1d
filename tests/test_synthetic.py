"""``--pretrain-epochs``: the encoder pretrained on synthetic dead-leaves images before any
data is seen (common/synthetic.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from common import synthetic
from common.config import FedConfig, TrainConfig, validate
from common.datasets import load_dataset
from common.model import build_model, initial_model

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = TrainConfig(width=8, embedding_dim=16, batch_size=32, device="cpu", pretrain_epochs=2,
                  pretrain_images=128)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_dead_leaves_cover_the_canvas_in_opaque_shapes_from_a_fixed_seed():
    x = synthetic.dead_leaves(64, (3, 16, 12))
    assert x.shape == (64, 3, 16, 12) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    torch.testing.assert_close(x, synthetic.dead_leaves(64, (3, 16, 12)))  # same seed
    assert not torch.equal(x, synthetic.dead_leaves(64, (3, 16, 12), seed=1))
    # Opaque shapes: an image has few distinct colours, each a region of pixels...
    colours = [len(torch.unique(img.reshape(3, -1), dim=1).T) for img in x]
    assert max(colours) < 16 * 12 / 2 and min(colours) >= 2
    # ...and images differ from one another.
    assert len({tuple(img.flatten()[:8].tolist()) for img in x}) == 64
    grey = synthetic.dead_leaves(8, (1, 8, 8))
    assert grey.shape == (8, 1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        synthetic.dead_leaves(4, (8, 8))


def test_pretraining_moves_the_encoder_and_gives_the_same_weights_for_the_same_settings(digits):
    synthetic._PRETRAINED.clear()
    random = build_model(CFG, digits.in_channels)
    first = initial_model(CFG, digits)
    moved = max(float((a - b).abs().max()) for a, b in
                zip(random.state_dict().values(), first.state_dict().values(), strict=True))
    assert moved > 1e-3
    synthetic._PRETRAINED.clear()  # computed again, not copied
    again = initial_model(CFG, digits)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # The data file is not part of the key (the views it resolves to are): a copy of the
    # data under another name takes the same weights.
    assert synthetic.pretrain_key(CFG, (1, 8, 8)) == synthetic.pretrain_key(
        replace(CFG, dataset="/elsewhere/digits-copy.npz", views="digits"), (1, 8, 8))
    assert synthetic.pretrain_key(CFG, (1, 8, 8)) != synthetic.pretrain_key(
        replace(CFG, views="images"), (1, 8, 8))  # digits' own views differ
    other_seed = initial_model(replace(CFG, seed=1), digits)
    assert any(not torch.equal(a, b) for a, b in
               zip(first.state_dict().values(), other_seed.state_dict().values(), strict=True))
    # Without pretraining the initial model is the random init.
    plain = initial_model(replace(CFG, pretrain_epochs=0), digits)
    for a, b in zip(random.state_dict().values(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_pretraining_learns_to_match_views_of_synthetic_images(digits):
    # The loss it trains falls: the views of one dead-leaves image find each other among
    # the batch's (instance retrieval on held-out synthetic images rises).
    from common.evaluation import instance_retrieval
    from common.plugins import make_views

    cfg = replace(CFG, pretrain_epochs=6, pretrain_images=512)
    held_out = synthetic.dead_leaves(256, (1, 8, 8), seed=7)
    g = torch.Generator().manual_seed(3)
    views = make_views(cfg)
    v1, v2 = views(held_out, g), views(held_out, g)

    def retrieval(model):
        with torch.no_grad():
            return instance_retrieval(model(v1), model(v2), candidates=64, seed=0)

    before = retrieval(build_model(cfg, 1).eval())
    after = retrieval(initial_model(cfg, digits).eval())
    assert after > before + 0.1


def test_pretraining_refuses_items_that_are_not_images():
    model = build_model(CFG, 4)
    with pytest.raises(ValueError, match="not \\(channels, height, width\\).*--pretrain-epochs 0"):
        synthetic.pretrain(model, CFG, (4, 100))


def test_pretraining_settings_are_checked():
    with pytest.raises(ValueError, match="--pretrain-epochs"):
        validate(FedConfig(pretrain_epochs=-1))
    with pytest.raises(ValueError, match="--pretrain-images"):
        validate(FedConfig(pretrain_epochs=1, pretrain_images=1))


def test_pretrained_weights_kept_in_a_directory_serve_another_process(digits, tmp_path, monkeypatch):
    synthetic._PRETRAINED.clear()
    first = initial_model(CFG, digits, cache_dir=tmp_path)
    (kept,) = tmp_path.glob("pretrained-*.pt")
    # Another process (here: an empty memo, and no images can be made) reads the weights.
    synthetic._PRETRAINED.clear()
    monkeypatch.setattr(synthetic, "dead_leaves", lambda *a, **k: pytest.fail("pretrained again"))
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path))
    read = initial_model(CFG, digits)
    for a, b in zip(first.state_dict().values(), read.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # Weights of other settings are not taken for these: a file under this name whose key
    # differs, or a torn file, is pretrained over.
    synthetic._PRETRAINED.clear()
    monkeypatch.undo()
    payload = torch.load(kept, weights_only=True)
    other = payload["key"].replace('"seed": 0', '"seed": 5')
    assert other != payload["key"]
    torch.save({**payload, "key": other}, kept)
    again = initial_model(CFG, digits, cache_dir=tmp_path)
    assert torch.load(kept, weights_only=True)["key"] == payload["key"]
    synthetic._PRETRAINED.clear()
    kept.write_bytes(b"torn")
    torn = initial_model(CFG, digits, cache_dir=tmp_path)
    for a, b, c in zip(first.state_dict().values(), again.state_dict().values(),
                       torn.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
