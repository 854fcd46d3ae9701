"""Every numeric config key has a declared range, checked when the config is built (issue 21
item 12): one mechanism (``Annotated[..., Range(...)]`` read by ``core.config_io.from_dict``),
NaN/inf refused for every float, a ConfigError naming the key before any work starts."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Annotated

import pytest

from modalign.benchmark.suite import Suite, load_suite
from modalign.config import Config, load_config
from modalign.core.config_io import Range, check_ranges, from_dict, unranged_numeric_keys
from modalign.core.errors import ConfigError
from modalign.pretrain.config import OptimConfig, TrainConfig
from modalign.server import ServeLimits, add_serve_command


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loss.init_temperature=0", "loss.init_temperature"),
        ("loss.init_temperature=nan", "loss.init_temperature"),
        ("loss.init_temperature=.nan", "loss.init_temperature"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=-inf", "optim.lr"),
        ("data.num_workers=-1", "data.num_workers"),
        ("model.embed_dim=0", "model.embed_dim"),
        ("data.image.max_pixels=0", "data.image.max_pixels"),
        ("data.image.hflip=1.5", "data.image.hflip"),
        ("data.audio.f_max=-1", "data.audio.f_max"),
        ("optim.betas=[0.9,1.0]", "optim.betas"),
        ("data.train={a.jsonl: 0}", "data.train.a.jsonl"),
        ("data.train={a.jsonl: .inf}", "data.train.a.jsonl"),
        ("finetune.threshold=2", "finetune.threshold"),
        ("train.seed=-1", "train.seed"),
    ],
)
def test_out_of_range_or_non_finite_values_are_refused_naming_the_key(
    override: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo", [override])


def test_one_modality_cannot_be_aligned_and_says_so() -> None:
    with pytest.raises(ConfigError, match=r"model\.modalities.*nothing to be aligned with"):
        load_config("demo", ["model.modalities=[image]"])
    with pytest.raises(ConfigError, match=r"model\.modalities"):
        load_config("demo", ["model.modalities=[image,image]"])


def test_every_numeric_key_declares_a_range() -> None:
    assert unranged_numeric_keys(Config) == []
    assert unranged_numeric_keys(Suite) == []
    assert unranged_numeric_keys(ServeLimits) == []


def test_configs_built_in_python_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match=r"optim\.eps"):
        OptimConfig(eps=math.nan)
    with pytest.raises(ConfigError, match="decode_timeout_s"):
        ServeLimits(decode_timeout_s=math.nan)


@dataclass
class Opts:
    rate: Annotated[float, Range(gt=0, le=1, note="1 = always")] = 0.5
    sizes: list[Annotated[int, Range(ge=1)]] | None = None


def test_range_is_read_from_the_annotation_by_from_dict() -> None:
    assert from_dict(Opts, {"rate": 1, "sizes": [1, 2]}).rate == 1.0
    with pytest.raises(ConfigError, match=r"opts\.rate=0\.0 is out of range: must be a number > 0 and <= 1 \(1 = always\)"):  # fmt: skip
        from_dict(Opts, {"rate": 0}, "opts")
    with pytest.raises(ConfigError, match=r"opts\.sizes\[1\]"):
        from_dict(Opts, {"sizes": [1, 0]}, "opts")
    with pytest.raises(ConfigError, match="finite"):
        check_ranges(Opts(rate=math.inf), "opts")


def test_benchmark_resamples_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="resamples"):
        load_suite("demo", ["resamples=-5"])


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-upload-mb", "nan"],
        ["--max-upload-mb", "inf"],
        ["--max-upload-mb", "0"],
        ["--decode-timeout", "nan"],
        ["--max-k", "0"],
    ],
)
def test_serve_flags_refuse_non_finite_and_out_of_range_values(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["serve", "--index", "x", *flags])
    assert exc.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_every_builtin_strategy_option_declares_a_range() -> None:
    import modalign.data.builtin_modalities
    import modalign.data.cache
    import modalign.pretrain.towers  # noqa: F401
    from modalign.benchmark.tasks import TASKS
    from modalign.data.config import ITEM_CACHES
    from modalign.data.modality import MODALITIES
    from modalign.finetune.heads import HEADS
    from modalign.finetune.pseudo.labelers import PSEUDO_LABELERS
    from modalign.finetune.pseudo.thresholds import THRESHOLDS
    from modalign.pretrain.losses import LOSSES, PAIR_POLICIES
    from modalign.pretrain.towers.api import TOWERS

    registries = [MODALITIES, ITEM_CACHES, TOWERS, LOSSES, PAIR_POLICIES, PSEUDO_LABELERS,
                  THRESHOLDS, HEADS, TASKS]  # fmt: skip
    missing = [
        f"{entry.name}: {key}"
        for registry in registries
        for entry in registry
        if entry.provider == "modalign"
        for key in unranged_numeric_keys(entry.options)
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("finetune.pseudo_label_options={k: 0}", "finetune.pseudo_label_options.k"),
        ("finetune.head={kind: late, options: {dropout: 1.5}}", "finetune.head.options.dropout"),
        ("data.cache={kind: memory, options: {max_bytes: 0}}", "data.cache.options.max_bytes"),
    ],
)
def test_strategy_options_are_range_checked_too(override: str, key: str) -> None:
    extra = ["finetune.pseudo_label=knn"] if "pseudo_label_options" in override else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo", [*extra, override])
