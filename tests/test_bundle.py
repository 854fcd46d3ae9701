"""Model bundles: safetensors + YAML + JSON only, faithful round trip, clear load errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import modalign
from modalign.config import load_config
from modalign.core.errors import UserInputError
from modalign.pretrain.trainer import pretrain

from conftest import tiny_overrides, write_tiny_corpus


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bundle")
    manifest = write_tiny_corpus(root / "corpus", n=16)
    out = root / "model"
    pretrain(load_config(None, tiny_overrides(manifest, out, steps=2, batch=8)))
    return manifest, out


def test_bundle_holds_no_pickles_and_references_text_model(bundle: tuple[Path, Path]) -> None:
    _, out = bundle
    files = {p.name for p in out.iterdir() if p.is_file()}
    assert {"config.yaml", "model.safetensors", "modalign.json"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".bin"))]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert not any(k.startswith("trunks.text.") for k in keys)  # frozen MiniLM is referenced
    assert any(k.startswith("heads.text.") for k in keys)  # its trained projection is stored


def test_encode_accepts_paths_bytes_pil_and_arrays(bundle: tuple[Path, Path]) -> None:
    manifest, out = bundle
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


def test_bundle_reproduces_training_encoder(bundle: tuple[Path, Path]) -> None:
    manifest, out = bundle
    a = modalign.load(out).encode(text=["x", "y"], image=[str(manifest.parent / "img" / "0.png")])
    b = modalign.load(out).encode(text=["x", "y"], image=[str(manifest.parent / "img" / "0.png")])
    assert torch.equal(a["text"], b["text"]) and torch.equal(a["image"], b["image"])


def test_load_errors_name_the_file(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = bundle
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


def test_pickle_in_bundle_dir_is_never_loaded(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """A planted pickle with a side effect must not run when the bundle is loaded."""
    _, out = bundle
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
