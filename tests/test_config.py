"""The typed config is the one source of defaults; flags and run-config keys derive from it."""

import argparse
import dataclasses
import json

import pytest

from common.config import (
    FedConfig,
    TrainConfig,
    add_config_arguments,
    flag_name,
    from_args,
    from_run_config,
    load_config,
    save_config,
    to_run_config,
)


def test_defaults_are_valid():
    TrainConfig()
    FedConfig()


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("temperature", 0.0, "--temperature"),
        ("temperature", float("nan"), "--temperature"),
        ("batch_size", 0, "--batch-size"),
        ("encoder", "vgg", "--encoder"),
        ("key_momentum", 1.5, "--key-momentum"),
    ],
)
def test_bad_values_name_their_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**{field: value})


def test_no_negatives_at_all_is_refused():
    with pytest.raises(ValueError, match="no negatives"):
        TrainConfig(in_batch=False, queue_size=0)


def test_every_field_becomes_a_flag_with_its_default_in_the_help():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, FedConfig)
    options = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for f in dataclasses.fields(FedConfig):
        action = options[flag_name(f.name)]
        assert "(default: " in parser._hidden_help.get(action, action.help)


def test_flags_override_base_and_unset_flags_keep_it():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    args = parser.parse_args(["--batch-size", "64", "--in-batch", "false", "--queue-size", "256",
                              "--key-mode", "ema"])
    cfg = from_args(TrainConfig, args, base={"epochs": 3, "lr": 0.1})
    assert (cfg.batch_size, cfg.in_batch, cfg.queue_size, cfg.epochs, cfg.lr) == (64, False, 256, 3, 0.1)
    assert cfg.temperature == TrainConfig().temperature


def _fed(argv: list[str], base: dict | None = None) -> FedConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, FedConfig)
    return from_args(FedConfig, parser.parse_args(argv), base=base)


def test_dp_selects_the_per_example_loss_unless_a_loss_setting_was_chosen():
    private = _fed(["--dp", "true", "--noise-multiplier", "1"])
    assert (private.objective, private.in_batch, private.key_mode, private.temperature,
            private.queue_temperature, private.negative_weight) == ("moment", False, "ema", 0.2,
                                                                    0.0, 2.0)
    warmer = _fed(["--dp", "true", "--noise-multiplier", "1", "--temperature", "0.5",
                   "--negative-weight", "1"])
    # a chosen temperature or weight stays
    assert (warmer.objective, warmer.temperature, warmer.negative_weight) == ("moment", 0.5, 1.0)
    assert _fed([]).objective == "infonce" and _fed([]).in_batch  # no DP: the default loss
    # A loss setting chosen by a flag or a saved config: nothing is selected, and what
    # cannot be per example is refused as before.
    with pytest.raises(ValueError, match="in-batch negatives couple"):
        _fed(["--dp", "true", "--noise-multiplier", "1", "--in-batch", "true"])
    with pytest.raises(ValueError, match="in-batch negatives couple"):
        _fed(["--dp", "true", "--noise-multiplier", "1", "--objective", "infonce"])
    with pytest.raises(ValueError, match="in-batch negatives couple"):
        _fed(["--dp", "true", "--noise-multiplier", "1"], base=dataclasses.asdict(FedConfig()))
    chosen = _fed(["--dp", "true", "--noise-multiplier", "1", "--in-batch", "false",
                   "--key-mode", "ema"])
    assert (chosen.objective, chosen.temperature) == ("infonce", FedConfig.temperature)


def test_run_config_round_trip_coerces_types():
    cfg = FedConfig(rounds=3, lr=0.1)
    rc = to_run_config(cfg)
    assert rc["batch-size"] == cfg.batch_size and "rounds" in rc
    rc["lr"] = 1  # TOML writes 1 where 1.0 is meant
    back = from_run_config(FedConfig, {**rc, "unrelated-key": "x"})
    assert back == dataclasses.replace(cfg, lr=1.0)
    assert isinstance(back.lr, float)


def test_saved_config_reloads_equal(tmp_path):
    cfg = FedConfig(rounds=7, dataset="x.npz")
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    assert load_config(tmp_path) == cfg  # a run directory works too


def test_saved_config_with_a_removed_setting_loads_with_a_warning_naming_it(tmp_path, caplog):
    cfg = TrainConfig(epochs=3)
    save_config(cfg, tmp_path / "config.json")
    payload = json.loads((tmp_path / "config.json").read_text())
    payload["config"]["retired_setting"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(payload))
    with caplog.at_level("WARNING", logger="common.config"):
        assert load_config(tmp_path) == cfg
    assert "retired_setting" in caplog.text and "CHANGELOG.md" in caplog.text


#: A saved config of the last version that had the negative-sampling options of issue #34,
#: each at the value that turned it off.
OLD_OFF = {"pull_policy": "uniform", "staleness_gamma": 1.0, "false_negative_mode": "off",
           "false_negative_top_k": 0, "false_negative_threshold": 1.0, "debias_tau_plus": 0.0,
           "neighbour_weight": 0.0, "prototypes": 0, "prototype_weight": 1.0,
           "push_timing": "after"}


def _saved_with(tmp_path, cfg, extra: dict):
    save_config(cfg, tmp_path / "config.json")
    payload = json.loads((tmp_path / "config.json").read_text())
    payload["config"].update(extra)
    (tmp_path / "config.json").write_text(json.dumps(payload))


def test_a_saved_config_with_the_removed_options_off_loads_as_it_ran(tmp_path, caplog):
    cfg = FedConfig(rounds=3)
    _saved_with(tmp_path, cfg, {**OLD_OFF, "prototype_weight": 0.25})  # no prototypes: no term
    with caplog.at_level("WARNING", logger="common.config"):
        assert load_config(tmp_path) == cfg
    assert caplog.text == ""  # nothing was dropped that changed the run


@pytest.mark.parametrize(("key", "value", "flag"), [
    ("pull_policy", "stratified", "--pull-policy"),
    ("pull_policy", "recent", "--pull-policy"),
    ("staleness_gamma", 0.5, "--staleness-gamma"),
    ("false_negative_mode", "drop", "--false-negative-mode"),
    ("false_negative_top_k", 8, "--false-negative-top-k"),
    ("debias_tau_plus", 0.1, "--debias-tau-plus"),
    ("neighbour_weight", 1.0, "--neighbour-weight"),
    ("prototypes", 64, "--prototypes"),
])
def test_a_saved_config_with_a_removed_option_on_is_refused_naming_it(tmp_path, key, value, flag):
    _saved_with(tmp_path, FedConfig(), {**OLD_OFF, key: value})
    with pytest.raises(ValueError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert f"{flag} {value!r} was removed" in message and "Removed options" in message
    assert f"Set it to {OLD_OFF[key]!r}" in message and "116213d" in message
    with pytest.raises(ValueError, match=flag):
        from_run_config(FedConfig, {flag[2:]: value})


def test_a_saved_config_pushing_before_training_is_refused_naming_the_last_commit_with_it(tmp_path):
    _saved_with(tmp_path, FedConfig(), {**OLD_OFF, "push_timing": "before"})
    with pytest.raises(ValueError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert "--push-timing 'before' was removed" in message and "Removed options" in message
    assert "Set it to 'after'" in message and "d191f04" in message and "116213d" not in message
    with pytest.raises(ValueError, match="--push-timing"):
        from_run_config(FedConfig, {"push-timing": "before"})


def test_a_run_config_may_still_name_a_removed_option_left_off():
    assert from_run_config(FedConfig, {"neighbour-weight": 0.0, "pull-policy": "uniform",
                                       "push-timing": "after"}) == FedConfig()
