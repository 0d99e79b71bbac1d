"""Plug-ins: built-ins and import paths resolve alike; a broken plug-in is named with its contract.

The user's plug-ins below live in a module of their own outside the project, as the
docs/plugins.md describes, and reach every entry point by import path.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

import pytest
import torch

from client.data import local_images
from client.settings import NodeSettings
from client.train_local import evaluate_run, train_local
from common import plugins
from common.checkpoint import encoder_spec, load_encoder, read_checkpoint, save_encoder
from common.config import (
    FedConfig,
    TrainConfig,
    add_config_arguments,
    from_args,
    from_run_config,
    to_run_config,
)
from common.datasets import DatasetError, load_dataset
from common.encoders import build_encoder
from common.plugins import PluginError, make_views

USER_MODULE = "fc_user_plugins"
USER_PLUGINS = '''
"""A user's own plug-ins: 2-channel signals of 16 samples, two classes."""
import torch
from torch import nn

from common.datasets import Dataset
from common.encoders import with_projection_head


def signals(arg, *, seed):
    n = int(arg or 40)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand(n, 2, 16, generator=g) + y.view(n, 1, 1).float()
    return Dataset("signals", x, y, x[: n // 4].clone(), y[: n // 4].clone(), ("low", "high"))


def float64_signals(arg, *, seed):
    ds = signals(arg, seed=seed)
    return Dataset("bad", ds.x_train.double(), ds.y_train, ds.x_test, ds.y_test, ds.class_names)


class MeanPool(nn.Module):
    def __init__(self, in_channels, width):
        super().__init__()
        self.proj = nn.Linear(in_channels, width)
        self.in_channels, self.feature_dim = in_channels, width

    def forward(self, x):
        return self.proj(x.mean(-1))


def pooled(in_channels, *, embedding_dim, norm, width):
    return with_projection_head(MeanPool(in_channels, width or 8), embedding_dim)


def wrong_dim(in_channels, *, embedding_dim, norm, width):
    return with_projection_head(MeanPool(in_channels, 4), embedding_dim + 1)


def bare_backbone(in_channels, *, embedding_dim, norm, width):
    return MeanPool(in_channels, 4)


def two_arguments(in_channels, embedding_dim):
    raise AssertionError("never called")


def noisy(cfg):
    return lambda x, generator=None: x + 0.1 * torch.randn(x.shape, generator=generator)


def shorter(cfg):
    return lambda x, generator=None: x[..., :-1]


def jitter(x, generator=None):
    return x


NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module", autouse=True)
def user_plugins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{USER_MODULE}.py").write_text(textwrap.dedent(USER_PLUGINS))
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))
    sys.modules.pop(USER_MODULE, None)


pytestmark = pytest.mark.usefixtures("one_thread")


def user(name: str) -> str:
    return f"{USER_MODULE}:{name}"


def test_builtins_are_import_paths_resolved_like_any_other():
    for kind, names in plugins.BUILTINS.items():
        for name, target in names.items():
            assert plugins.resolve(kind, name) is plugins.resolve(kind, target), (kind, name)
    assert plugins.builtin_names("encoder") == ("cnn", "cnn1d", "resnet18")


@pytest.mark.parametrize("settings, message", [
    ({"encoder": "vit"}, r"--encoder 'vit' is neither .* built-ins: cnn, cnn1d, resnet18; .*"
                         r"EncoderFactory\(in_channels: int"),
    ({"views": "imgs"}, r"built-ins: digits, dna, images; .*ViewFactory\(cfg: TrainConfig\) -> ViewFn"),
    ({"encoder": "cnn:8"}, "only datasets take an argument"),
    ({"encoder": "nowhere.to_be:found"}, r"cannot import module 'nowhere.to_be' "
                                         r"\(ModuleNotFoundError.*importable in every process"),
    ({"dataset": "imagenet.v2:load"}, "cannot import module 'imagenet.v2'"),
    ({"encoder": "common.examples.dna:encodr"}, "'common.examples.dna' has no attribute 'encodr'; did you mean encoder"),
    ({"views": user("NOT_CALLABLE")}, "is a int, not callable; expected ViewFactory"),
    ({"encoder": user("two_arguments")}, r"signature \(in_channels, embedding_dim\), which "
                                         "cannot be called as EncoderFactory"),
])
def test_settings_refuse_a_plugin_that_cannot_be_resolved(settings, message):
    with pytest.raises(PluginError, match=message):
        FedConfig(**settings)


def test_a_dataset_name_that_is_no_plugin_lists_the_builtins_and_the_forms():
    with pytest.raises(DatasetError, match=r"digits, synthetic:N, dna.*package.module:name\[:ARG\]"):
        load_dataset("imagenet")
    with pytest.raises(PluginError, match="'digitz' is not a built-in dataset either: cifar10, digits"):
        load_dataset("digitz:all")


def test_views_of_the_wrong_shape_name_the_plugin_and_both_shapes():
    views = make_views(TrainConfig(views=user("shorter")))
    with pytest.raises(PluginError, match=rf"--views '{user('shorter')}' returned float32 "
                                          r"\(4, 2, 15\) on cpu for a batch float32 \(4, 2, 16\)"):
        views(torch.rand(4, 2, 16))


def test_a_view_function_given_where_a_factory_belongs_is_explained():
    with pytest.raises(PluginError, match=r"returned a TrainConfig when called with the run's "
                                          r"settings.*wrap it, def views\(cfg\)"):
        make_views(TrainConfig(views=user("jitter")))


def test_image_views_on_sequences_point_to_the_views_setting():
    with pytest.raises(ValueError, match="image views: for other data choose --views"):
        make_views(TrainConfig())(torch.rand(4, 4, 32))


@pytest.mark.parametrize("factory, message", [
    ("bare_backbone", "returned a MeanPool; an EncoderFactory returns a "
                      "common.encoders.ContrastiveModel"),
    ("wrong_dim", "was asked for in_channels=2, embedding_dim=8 and built in_channels=2, embedding_dim=9"),
])
def test_an_encoder_that_breaks_the_contract_is_named(factory, message):
    with pytest.raises(PluginError, match=rf"--encoder '{user(factory)}' {message}"):
        build_encoder(user(factory), in_channels=2, embedding_dim=8)


def test_a_dataset_plugin_gets_its_argument_and_the_seed_and_is_checked():
    a, b = load_dataset(user("signals:12"), seed=1), load_dataset(user("signals:12"), seed=1)
    assert a.x_train.shape == (12, 2, 16) and a.num_classes == 2 and a.in_channels == 2
    assert torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, load_dataset(user("signals:12"), seed=2).x_train)
    with pytest.raises(DatasetError, match=rf"--dataset '{user('float64_signals')}': x_train is "
                                           r"float64 \(40, 2, 16\); expected a float32"):
        load_dataset(user("float64_signals"))


def test_a_plugin_encoder_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_encoder(user("pooled"), in_channels=2, embedding_dim=8, width=6)
    assert model.encoder_name == user("pooled")
    spec = encoder_spec(user("pooled"), 2, 8, "group", 6)
    save_encoder(model, spec, tmp_path / "encoder.pt")
    assert read_checkpoint(tmp_path / "encoder.pt")["spec"]["encoder"] == user("pooled")
    loaded = load_encoder(tmp_path / "encoder.pt")
    x = torch.rand(5, 2, 16)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_import_paths_pass_through_flags_and_the_flower_run_config():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, FedConfig)
    args = parser.parse_args(["--dataset", user("signals:20"), "--encoder", user("pooled"),
                              "--views", "common.examples.dna:views"])
    cfg = from_args(FedConfig, args)
    assert (cfg.dataset, cfg.encoder, cfg.views) == (user("signals:20"), user("pooled"),
                                                     "common.examples.dna:views")
    assert from_run_config(FedConfig, to_run_config(cfg)) == cfg


def test_a_nodes_own_data_can_be_a_plugin(tmp_path):
    node = NodeSettings.from_node_config({"data-path": user("signals:20"), "client-id": "lab-a",
                                          "state-dir": str(tmp_path)})
    assert local_images(FedConfig(), node).shape == (20, 2, 16)
    with pytest.raises(ValueError, match=r"must be an .npz file or a dataset plug-in"):
        local_images(FedConfig(), NodeSettings("lab-a", tmp_path, data_path="reads.csv"))


@pytest.mark.timeout(120)
def test_train_local_and_evaluate_run_on_the_users_own_data_encoder_and_views(tmp_path):
    cfg = TrainConfig(dataset=user("signals:64"), encoder=user("pooled"), views=user("noisy"),
                      width=8, embedding_dim=8, epochs=2, batch_size=16, device="cpu")
    summary = train_local(cfg, tmp_path / "run", quiet=True)
    assert summary["dataset"] == "signals" and summary["train_examples"] == 64
    again = evaluate_run(tmp_path / "run", device="cpu")  # rebuilt from the recorded import path
    assert again["trained"]["knn_backbone"] == pytest.approx(summary["trained"]["knn_backbone"])
