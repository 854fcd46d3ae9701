"""``modalign data avmnist``: an AV-MNIST-style tri-modal corpus from real MNIST + FSDD.

Each Free Spoken Digit Dataset recording ``{digit}_{speaker}_{take}.wav`` is paired by digit
with MNIST image(s) and a caption naming the digit. FSDD's official split decides the side:
takes 5-49 pair with MNIST *train* images (``train.jsonl``), takes 0-4 with MNIST *test* images
(``test.jsonl``), so no image or recording is shared across splits. Pairing is by digit only:
retrieval on this corpus is judged at class level.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modalign.core.errors import DataError
from modalign.data.demo_corpus import DIGIT_WORDS

CAPTIONS = (
    "the digit {}",
    "a handwritten {}",
    "someone says {}",
    "the number {}",
    "a spoken {}",
    "{}, written and spoken",
    "an image and a recording of {}",
    "the word {}",
)
FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
TEST_TAKES = range(0, 5)  # FSDD's official test split
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip or plain): uint8 images (n, rows, cols) or labels (n,)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not a uint8 IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - start != expected:
        raise DataError(f"{path}: IDX header says {dims} but holds {len(data) - start} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def load_mnist(mnist_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) uint8) for ``split`` in ``train``/``test``."""
    root = Path(mnist_dir)
    images_name, labels_name = MNIST_FILES[split]
    images, labels = _find(root, images_name), _find(root, labels_name)
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{images}: {x.shape} images do not match {labels}: {y.shape} labels")
    return x, y


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root / name}: MNIST file not found; pass the folder holding the IDX files")


def list_fsdd(fsdd_dir: str | Path) -> list[tuple[Path, int, str, int]]:
    """(path, digit, speaker, take) per recording, sorted; accepts the root or ``recordings/``."""
    root = Path(fsdd_dir)
    folder = root / "recordings" if (root / "recordings").is_dir() else root
    if not folder.is_dir():
        raise DataError(f"{root}: FSDD folder not found")
    out = []
    for path in sorted(folder.iterdir()):
        match = FSDD_NAME.match(path.name)
        if match:
            out.append((path, int(match[1]), match[2], int(match[3])))
    if not out:
        raise DataError(f"{folder}: no FSDD recordings named {{digit}}_{{speaker}}_{{take}}.wav")
    return out


def build_avmnist(
    mnist_dir: str | Path,
    fsdd_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    images_per_recording: int = 1,
    copy_audio: bool = True,
) -> dict[str, Any]:
    """Write ``images/*.png``, ``audio/*.wav``, ``train.jsonl`` and ``test.jsonl`` into ``out_dir``.

    Rows: ``id``, ``image``, ``audio``, ``text``, ``label`` (digit word), plus ``digit``,
    ``speaker`` and ``take`` (for speaker-disjoint splits). Images of a digit are drawn without
    replacement (seeded) until exhausted. ``copy_audio=False`` references the FSDD files by
    absolute path instead of copying them. Returns ``{"out", "train", "test", "items":
    {"train": n, "test": n}, "images", "wall_s"}``.
    """
    if images_per_recording < 1:
        raise DataError(f"images_per_recording must be >= 1, got {images_per_recording}")
    started = time.perf_counter()
    out = Path(out_dir)
    recordings = list_fsdd(fsdd_dir)
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if copy_audio:
        (out / "audio").mkdir(parents=True, exist_ok=True)
    paths, written = {}, 0
    for split in ("train", "test"):
        images, labels = load_mnist(mnist_dir, split)
        chosen = [r for r in recordings if (r[3] in TEST_TAKES) == (split == "test")]
        pools = _ImagePools(labels, rng)
        rows = []
        for path, digit, speaker, take in chosen:
            audio = _place_audio(path, out, copy_audio)
            for j in range(images_per_recording):
                index = pools.draw(digit)
                image = f"images/{split}-{index:05d}.png"
                if not (out / image).is_file():
                    _write_png(images[index], out / image)
                    written += 1
                suffix = f"-{j}" if images_per_recording > 1 else ""
                word = DIGIT_WORDS[digit]
                rows.append(
                    {
                        "id": f"{digit}_{speaker}_{take}{suffix}",
                        "image": image,
                        "audio": audio,
                        "text": CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(word),
                        "label": word,
                        "digit": digit,
                        "speaker": speaker,
                        "take": take,
                    }
                )
        paths[split] = out / f"{split}.jsonl"
        _write_jsonl(paths[split], rows)
    return {
        "out": str(out),
        "train": str(paths["train"]),
        "test": str(paths["test"]),
        "items": {s: sum(1 for _ in open(p, encoding="utf-8")) for s, p in paths.items()},
        "images": written,
        "wall_s": round(time.perf_counter() - started, 3),
    }


class _ImagePools:
    """Per-digit shuffled image indices, drawn without replacement and reshuffled when empty."""

    def __init__(self, labels: np.ndarray, rng: np.random.Generator) -> None:
        self.rng = rng
        self.by_digit = {d: np.flatnonzero(labels == d) for d in range(10)}
        self.queues: dict[int, list[int]] = {d: [] for d in range(10)}

    def draw(self, digit: int) -> int:
        if len(self.by_digit[digit]) == 0:
            raise DataError(f"MNIST has no image of digit {digit}")
        if not self.queues[digit]:
            self.queues[digit] = self.rng.permutation(self.by_digit[digit]).tolist()
        return int(self.queues[digit].pop())


def _place_audio(path: Path, out: Path, copy: bool) -> str:
    if not copy:
        return str(path.resolve())
    target = out / "audio" / path.name
    if not target.is_file() or target.stat().st_size != path.stat().st_size:
        shutil.copyfile(path, target)
    return f"audio/{path.name}"


def _write_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG")


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
