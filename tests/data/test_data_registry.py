"""Modalities as registry plugins: a new modality touches no file of modalign.data.

The ``npydepth`` modality below is defined here only (factory + options dataclass registered in
``MODALITIES``, as an entry-point hook would) and then goes through manifest reading, ``data
pack`` shards, ``data inspect``, collation into a :class:`Batch` and perturbation.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modalign.core.config_io import from_dict
from modalign.core.errors import ConfigError
from modalign.data.batch import Batch
from modalign.data.config import DataConfig
from modalign.data.decode import BadItem
from modalign.data.inspect import inspect_source
from modalign.data.modality import (
    MODALITIES,
    ImagePreset,
    ModalitySpec,
    StatKind,
    modality_specs,
)
from modalign.data.pack import pack_shards
from modalign.data.sources import open_eval_source, open_source

from helpers.data import jpeg_bytes, png_bytes, small_config, write_manifest, write_shard

NAME = "npydepth"
SMALL = {"image": ImagePreset(input_size=16)}


@dataclass
class DepthOptions:
    side: int = 8
    max_depth: float = 10.0


def depth_factory(data_cfg: DataConfig, options: DepthOptions, preset: Any) -> ModalitySpec:
    """``.npy`` depth maps of ``side x side`` metres in [0, max_depth]."""

    def decode(source: Any) -> np.ndarray:
        try:
            arr = np.load(io.BytesIO(source) if isinstance(source, bytes) else source)
        except (OSError, ValueError) as exc:
            raise BadItem("unreadable_depth", str(exc)[:80]) from None
        if arr.shape != (options.side, options.side):
            raise BadItem("bad_depth_shape", f"{arr.shape}")
        return arr.astype(np.float32)

    def perturb(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
        return (x + level * torch.randn(x.shape, generator=gen)).clamp(0, options.max_depth)

    return ModalitySpec(
        NAME,
        lambda source, train, rng: torch.from_numpy(decode(source)).unsqueeze(0),
        torch.zeros(1, options.side, options.side),
        extensions=("npy",),
        decode=decode,
        describe=lambda arr: {"depth_max": float(arr.max())},
        stats=(StatKind("depth_max", "summary"),),
        perturb_fn=perturb,
        options=options,
    )


@pytest.fixture
def depth_registered() -> Iterator[None]:
    MODALITIES.add(NAME, depth_factory, DepthOptions)
    try:
        yield
    finally:
        MODALITIES._entries.pop(NAME, None)  # test-only: leave the registry as it was


def _corpus(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"r{i}", "text": f"scene {i}", "label": str(i % 2)}
        if i != 3:  # row 3 has no depth map
            np.save(root / f"d{i}.npy", np.full((8, 8), float(i), dtype=np.float32))
            row[NAME] = f"d{i}.npy"
        if i == 5:
            np.save(root / "d5.npy", np.zeros((4, 4), dtype=np.float32))  # wrong shape: bad
        (root / f"i{i}.png").write_bytes(png_bytes(40 * i, size=16))
        row["image"] = f"i{i}.png"
        rows.append(row)
    return write_manifest(root / "m.jsonl", rows)


def _specs(**options: Any) -> dict[str, ModalitySpec]:
    cfg = small_config()
    cfg.modalities = {NAME: options} if options else {}
    return modality_specs(["image", "text", NAME], cfg, SMALL)


def _batch(source: Any, size: int = 16) -> Batch:
    return next(iter(source.batches(size)))


def test_plugin_modality_reads_manifest_and_packed_shards(tmp_path: Path, depth_registered) -> None:
    manifest = _corpus(tmp_path / "c")
    specs = _specs()
    batch = _batch(open_eval_source(manifest, specs))
    assert batch.ids == [f"r{i}" for i in range(6)]
    assert batch.present[NAME].tolist() == [True, True, True, False, True, False]
    assert batch.inputs[NAME].shape == (6, 1, 8, 8) and float(batch.inputs[NAME][4].max()) == 4.0
    assert [r.reason for r in batch.bad] == ["bad_depth_shape"] and "d5.npy" in batch.bad[0].detail

    result = pack_shards(manifest, tmp_path / "shards", shard_size=4, cfg=small_config())
    assert (
        result["written"] == 6
        and result["shards"] == 2
        and result["bad_by_reason"] == {"bad_depth_shape": 1}
    )
    assert result["modalities"][NAME] == ["npy"] and result["unknown_columns"] == []
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["counts"] == [4, 2] and index["format"] == "modalign.shards"
    from_shards = _batch(open_eval_source(result["pattern"], specs))
    assert from_shards.ids == batch.ids and from_shards.labels == batch.labels
    for m in batch.inputs:
        assert torch.equal(from_shards.present[m], batch.present[m])
    torch.testing.assert_close(from_shards.inputs[NAME], batch.inputs[NAME])
    torch.testing.assert_close(from_shards.inputs["image"], batch.inputs["image"])


def test_plugin_modality_inspect_and_perturb(tmp_path: Path, depth_registered) -> None:
    manifest = _corpus(tmp_path / "c")
    report = inspect_source(manifest, small_config())
    assert report["modalities"] == {"image": 6, "text": 6, NAME: 4}
    assert report["modality_bad"] == {NAME: {"bad_depth_shape": 1}}
    assert report["depth_max"] == {"min": 0.0, "mean": 1.75, "max": 4.0, "total": 7.0}
    assert report["image_size"] == {"min": [16, 16], "max": [16, 16]}

    specs = _specs(max_depth=3.0)  # options from data.modalities.npydepth
    x = _batch(open_eval_source(manifest, specs)).inputs[NAME]
    noisy = specs[NAME].perturb(x, 0.5, torch.Generator().manual_seed(0))
    assert float(noisy.max()) <= 3.0 and float(noisy.min()) >= 0.0 and not torch.equal(noisy, x)
    assert specs[NAME].perturb(x, 0.0, torch.Generator()) is x


def test_plugin_options_are_checked_naming_the_key(depth_registered) -> None:
    with pytest.raises(ConfigError, match=rf"data\.modalities\.{NAME}\.sides"):
        _specs(sides=3)
    cfg = from_dict(DataConfig, {"modalities": {NAME: {"side": 4}}}, "data")
    assert modality_specs([NAME], cfg)[NAME].options == DepthOptions(side=4)
    typo = from_dict(DataConfig, {"modalities": {"npydeph": {}}}, "data")
    with pytest.raises(ConfigError, match=r"data\.modalities\.npydeph: unknown modality"):
        modality_specs(["text"], typo)
    with pytest.raises(ConfigError, match=r"data\.image section"):
        from_dict(DataConfig, {"modalities": {"image": {"channels": 1}}}, "data")


def test_unknown_modality_names_the_entry_point_group() -> None:
    with pytest.raises(ConfigError, match=r"'sonar'.*modalign\.modalities"):
        modality_specs(["image", "sonar"])


@pytest.mark.parametrize("name", ["present", "id", "label"])
def test_modality_named_like_a_reserved_column_is_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=rf"reserved column '{name}'"):
        modality_specs([name])
    text = modality_specs(["text"])["text"]
    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "text": "x"}])
    with pytest.raises(ConfigError, match=rf"reserved column '{name}'"):
        open_source(manifest, {name: text})


def test_img2dataset_shards_read_by_eval_source(tmp_path: Path) -> None:
    samples = [
        {
            "__key__": f"{i:09d}",
            "jpg": jpeg_bytes(32, seed=i),
            "txt": f"a photo number {i}",
            "json": json.dumps(
                {
                    "key": f"{i:09d}",
                    "url": f"http://x/{i}.jpg",
                    "caption": f"a photo number {i}",
                    "status": "success",
                    "width": 32,
                    "height": 32,
                }
            ),
        }
        for i in range(5)
    ]
    write_shard(tmp_path / "00000.tar", samples[:3])
    write_shard(tmp_path / "00001.tar", samples[3:])
    specs = modality_specs(["image", "text"], small_config(), SMALL)
    source = open_eval_source(str(tmp_path / "{00000..00001}.tar"), specs)
    batches = list(source.batches(2))
    ids = [i for b in batches for i in b.ids]
    assert ids == [f"{i:09d}" for i in range(5)] and not any(b.bad for b in batches)
    assert batches[0].inputs["text"] == ["a photo number 0", "a photo number 1"]
    assert batches[0].inputs["image"].shape[0] == 2 and batches[0].labels == [None, None]
    first = next(iter(source))
    assert first.meta["url"] == "http://x/0.jpg" and first.meta["status"] == "success"
    folder = open_eval_source(tmp_path, specs)  # img2dataset's output folder works too
    assert [i for b in folder.batches(4) for i in b.ids] == ids
    assert inspect_source(tmp_path, small_config())["format"] == "webdataset"


def test_batch_moves_fills_absent_and_keeps_old_keys(tmp_path: Path) -> None:
    specs = modality_specs(["image", "text"], small_config(), SMALL)
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]
    )
    batch = _batch(open_eval_source(manifest, specs))
    assert len(batch) == 2 and batch.modalities == ["text"]
    full = batch.with_absent(specs)
    assert full.inputs["image"].shape == (2, 1, 16, 16) and not full.present["image"].any()
    assert "image" not in batch.inputs  # a copy: the original is unchanged
    moved = full.to("cpu")
    assert moved.inputs["text"] == ["x", "y"] and moved.present["text"].tolist() == [True, True]
    assert batch.ids == ["a", "b"] and batch.labels == [None, None]
    assert batch.present["text"].all() and batch.inputs["text"] == ["x", "y"]
    assert batch.index.tolist() == [0, 1] and batch.bad == [] and "audio" not in batch.inputs
    with pytest.raises(TypeError):  # typed fields only: no dict-style access
        batch["id"]  # type: ignore[index]


def test_eval_source_keeps_file_order_with_workers(tmp_path: Path) -> None:
    specs = modality_specs(["text"])
    rows = [{"id": f"r{i}", "text": f"t {i}"} for i in range(11)]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    for workers in (0, 2):
        ids = [i for b in open_eval_source(manifest, specs).batches(3, workers) for i in b.ids]
        assert ids == [r["id"] for r in rows], workers
    half = open_eval_source(manifest, specs, rank=1, world_size=2)
    assert [i for b in half.batches(4) for i in b.ids] == [f"r{i}" for i in range(1, 11, 2)]
