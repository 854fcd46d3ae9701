"""A tiny synthetic paired corpus, the fast-run config overrides, the real-data folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SHARED_DATA = Path(
    os.environ.get("MODALIGN_DATA", Path(__file__).resolve().parents[3] / "shared" / "datasets")
)
WORDS = ["zero", "one", "two", "three"]


def write_tiny_corpus(
    root: Path, n: int = 32, classes: int = 4, seed: int = 0, sample_rate: int = 8000
) -> Path:
    """Class-dependent images (bright quadrant), tones (class pitch) and captions."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = i % classes
        img = rng.integers(0, 60, size=(16, 16), dtype=np.uint8)
        r, c = divmod(label, 2)
        img[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 180
        Image.fromarray(img, mode="L").save(root / "img" / f"{i}.png")
        t = np.arange(int(sample_rate * 0.5)) / sample_rate
        wave = 0.5 * np.sin(2 * np.pi * (300 + 250 * label) * t) + 0.01 * rng.standard_normal(
            t.size
        )
        sf.write(root / "wav" / f"{i}.wav", wave.astype(np.float32), sample_rate)
        rows.append(
            {
                "id": f"item{i}",
                "image": f"img/{i}.png",
                "audio": f"wav/{i}.wav",
                "text": f"the sound {WORDS[label]}",
                "label": WORDS[label],
            }
        )
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def tiny_overrides(manifest: Path, out: Path, steps: int = 2, batch: int = 8) -> list[str]:
    """--set overrides for a fast CPU run: tiny towers, small audio front end."""
    return [
        f"data.train={manifest}",
        "data.image.channels=1",
        "data.image.hflip=0.0",
        "data.audio.sample_rate=8000",
        "data.audio.clip_seconds=0.5",
        "data.audio.n_mels=16",
        "data.audio.n_fft=256",
        "data.audio.hop_length=128",
        "model.embed_dim=16",
        "model.towers.image.arch=test_resnet",
        "model.towers.image.input_size=16",
        "model.towers.image.in_chans=1",
        "model.towers.audio.arch=test_resnet",
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        "train.progress=false",
        "train.log_every=1",
        "train.checkpoint_every=1",
        "optim.warmup_steps=0",
        f"output.dir={out}",
    ]
