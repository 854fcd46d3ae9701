"""Config: YAML + --set overrides onto typed dataclasses; errors name the key and choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modalign.config import builtin_configs, load_config
from modalign.core.config_io import dump_yaml
from modalign.core.errors import ConfigError


def test_builtin_demo_loads_and_overrides_apply() -> None:
    cfg = load_config(
        "demo", ["train.steps=7", "model.towers.image.arch=resnet18", "optim.betas=[0.8, 0.9]"]
    )
    assert "demo" in builtin_configs()
    assert cfg.train.steps == 7
    assert cfg.model.towers["image"].arch == "resnet18"
    assert cfg.model.towers["image"].input_size == 32  # untouched keys of the section survive
    assert cfg.optim.betas == [0.8, 0.9]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.stpes=3", "train.stpes"),
        ("train.steps=abc", "train.steps"),
        ("loss.kind=foo", "infonce, siglip"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("model.towers.image.lock=maybe", "none, all, partial"),
        ("model.modalities=[image, depth]", "depth"),
        ("train.steps", "KEY=VALUE"),
    ],
)
def test_bad_override_names_key_and_choices(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config("demo", [override])


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "train.batchsize" in str(info.value) and "batch_size" in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="built-in"):
        load_config("no-such-config-name")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("demo", ["train.steps=11"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(str(path))
    assert again == cfg
    assert yaml.safe_load(path.read_text())["train"]["steps"] == 11


def test_int_accepted_for_float_but_not_bool_for_int() -> None:
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=true"])


def test_float_written_without_dot_is_a_number() -> None:
    # YAML 1.1 reads 5e-4 as a string; users mean the number.
    assert load_config(None, ["optim.lr=5e-4"]).optim.lr == 5e-4
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])


def test_every_builtin_config_loads() -> None:
    for name in builtin_configs():
        cfg = load_config(name)
        assert cfg.model.modalities and cfg.train.steps > 0


def test_set_takes_several_pairs_per_flag_and_repeated_flags() -> None:
    from modalign.cli import build_parser
    from modalign.cli.common import load_cli_config

    args = build_parser().parse_args(
        ["pretrain", "demo", "--set", "train.steps=7", "model.embed_dim=32", "--set",
         "train.batch_size=4", "--json"]
    )  # fmt: skip
    assert args.set == ["train.steps=7", "model.embed_dim=32", "train.batch_size=4"] and args.json
    cfg = load_cli_config(args)
    assert (cfg.train.steps, cfg.model.embed_dim, cfg.train.batch_size) == (7, 32, 4)
