"""Frozen towers computed in the loader (``train.frozen_towers``) train exactly like the step.

* ``loader`` vs ``step``: same weights, bit for bit, with one torch thread (manifest and shard
  sources, with a frozen audio tower whose SpecAugment draws from the item keys, and with
  GradCache accumulation);
* the hook computes what the encoder computes, fills only modalities the batch has, and the
  encoder then runs only the heads for them;
* ``auto`` moves frozen towers to the loader only on CPU/fp32 with workers and cores to spare,
  ``loader`` under sharded engines is refused up front (tests/pretrain/test_engines.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modalign.core.errors import ConfigError
from modalign.data.batch import Batch
from modalign.pretrain.towers.in_loader import (
    FrozenTowersHook,
    frozen_modalities,
    loader_modalities,
)

from helpers.corpus import tiny_overrides, write_tiny_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("loader_towers"), n=24)


def _train(src: Path | str, out: Path, frozen_towers: str, *extra: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from modalign.config import load_config
    from modalign.pretrain.trainer import pretrain

    overrides = [
        *tiny_overrides(Path(src), out, steps=3, batch=8),
        f"data.train={src}",
        "data.num_workers=1",
        "train.threads=1",
        "train.checkpoint_every=0",
        "train.val_every=0",
        "model.towers.audio.lock=all",  # frozen, with SpecAugment before it (item keys)
        f"train.frozen_towers={frozen_towers}",
        *extra,
    ]
    pretrain(load_config("demo", overrides))
    return load_file(str(out / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("extra", [(), ("train.accum_steps=2",)], ids=["plain", "gradcache"])
def test_loader_and_step_train_the_same_weights(
    corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: tuple[str, ...]
) -> None:
    with caplog.at_level(logging.INFO, logger="modalign.pretrain.trainer"):
        loader = _train(corpus, tmp_path / "loader", "loader", *extra)
    assert "frozen towers run in the loader: audio, text" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="modalign.pretrain.trainer"):
        step = _train(corpus, tmp_path / "step", "step", *extra)
    assert "frozen towers run in the loader" not in caplog.text
    _assert_same(loader, step)
    # The test can tell runs apart: the trainable image tower moved.
    assert any("trunks.image" in k for k in loader)


def test_loader_towers_on_shards_train_like_the_step(corpus: Path, tmp_path: Path) -> None:
    from modalign.data.pack import pack_shards

    from helpers.data import small_config

    report = pack_shards(corpus, tmp_path / "shards", shard_size=8, cfg=small_config())
    loader = _train(report["pattern"], tmp_path / "loader", "loader")
    step = _train(report["pattern"], tmp_path / "step", "step")
    _assert_same(loader, step)


def _encoder():
    from modalign.config import load_config
    from modalign.pretrain.model import build_encoder

    cfg = load_config("demo", [*tiny_overrides(Path("x.jsonl"), Path("out")),
                               "model.towers.audio.lock=all"])  # fmt: skip
    torch.manual_seed(0)
    return build_encoder(cfg.model, cfg.data).encoder, cfg


def _batch(with_text: bool = True) -> Batch:
    n = 3
    inputs = {"image": torch.rand(n, 1, 16, 16), "audio": torch.randn(n, 4000) * 0.1}
    present = {m: torch.ones(n, dtype=torch.bool) for m in inputs}
    if with_text:
        inputs["text"] = ["a cat", "the sound one", "a dog"]
        present["text"] = torch.ones(n, dtype=torch.bool)
    return Batch(inputs, present, ids=["a", "b", "c"], labels=[None] * n,
                 index=torch.arange(n), keys=torch.tensor([11, 12, 13]))  # fmt: skip


def test_hook_computes_what_the_encoder_computes() -> None:
    from modalign.data.item_keys import item_keys

    encoder, _ = _encoder()
    encoder.train()
    assert frozen_modalities(encoder) == ["audio", "text"]
    hook = FrozenTowersHook(encoder, ["audio", "text"])
    batch = hook(_batch())
    assert set(batch.encoded) == {"audio", "text"}
    with torch.no_grad(), item_keys(batch.keys):
        for m in ("audio", "text"):
            want = encoder.trunks[m](encoder.preprocessors[m](batch.inputs[m]))
            assert torch.equal(batch.encoded[m], want), m
        # the encoder runs only the heads where trunk outputs are given
        with_encoded = encoder(batch.inputs, encoded=batch.encoded)
        plain = encoder(batch.inputs)
    for m in plain:
        assert torch.equal(with_encoded[m], plain[m]), m
    fake = {"text": torch.zeros_like(batch.encoded["text"])}
    with torch.no_grad():
        assert not torch.equal(encoder(batch.inputs, encoded=fake)["text"], plain["text"])


def test_hook_leaves_absent_modalities_to_the_step() -> None:
    encoder, _ = _encoder()
    batch = FrozenTowersHook(encoder, ["audio", "text"])(_batch(with_text=False))
    assert set(batch.encoded) == {"audio"}
    moved = batch.to("cpu")
    assert torch.equal(moved.encoded["audio"], batch.encoded["audio"])
    assert batch.select(["image"]).encoded == {}


def _accelerator(device: str = "cpu", precision: str = "no", engine: str = "NO"):
    return SimpleNamespace(
        device=torch.device(device),
        mixed_precision=precision,
        distributed_type=SimpleNamespace(value=engine),
    )


def test_auto_moves_frozen_towers_only_where_it_can_help(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder, _ = _encoder()
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        frozen = ["audio", "text"]
        assert loader_modalities("auto", encoder, _accelerator(), 1) == frozen
        assert loader_modalities("auto", encoder, _accelerator("cuda"), 1) == []
        assert loader_modalities("auto", encoder, _accelerator(precision="bf16"), 1) == []
        assert loader_modalities("auto", encoder, _accelerator(engine="FSDP"), 1) == []
        assert loader_modalities("auto", encoder, _accelerator(), 0) == []
        assert loader_modalities("auto", encoder, _accelerator(), 2) == []  # 1 + 2 > 2 cores
        assert loader_modalities("auto", encoder, _accelerator(), 1, compiled=True) == []
        assert loader_modalities("step", encoder, _accelerator(), 1) == []
        assert loader_modalities("loader", encoder, _accelerator("cuda"), 0) == frozen
    finally:
        torch.set_num_threads(threads)


def test_no_frozen_tower_means_no_hook() -> None:
    encoder, _ = _encoder()
    for p in encoder.trunks["audio"].parameters():
        p.requires_grad_(True)
    for p in encoder.trunks["text"].parameters():
        p.requires_grad_(True)
    assert frozen_modalities(encoder) == []
    assert loader_modalities("loader", encoder, _accelerator(), 1) == []


def test_frozen_towers_key_is_checked() -> None:
    from modalign.config import load_config

    with pytest.raises(ConfigError, match="train.frozen_towers"):
        load_config("demo", ["train.frozen_towers=workers"])
