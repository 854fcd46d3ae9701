"""``modalign data avmnist``: an AV-MNIST-style tri-modal corpus from real MNIST + FSDD.

Each Free Spoken Digit Dataset recording ``{digit}_{speaker}_{take}.wav`` is paired by digit
with MNIST image(s) and a caption naming the digit. FSDD's official split decides the side:
takes 5-49 pair with MNIST *train* images (``train.jsonl``), takes 0-4 with MNIST *test* images
(``test.jsonl``), so no image or recording is shared across splits. Pairing is by digit only:
retrieval on this corpus is judged at class level.
"""

from __future__ import annotations

import gzip
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from modalign.core.errors import DataError
from modalign.data.corpora.demo import DIGIT_WORDS
from modalign.data.corpora.files import commit_manifests, corpus_folder

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
    paths = {split: out / f"{split}.jsonl" for split in ("train", "test")}
    manifests, written = {}, 0
    with corpus_folder(out, [p.name for p in paths.values()], "AV-MNIST corpus"):
        for split, path in paths.items():
            plan = _SplitWriter(out, split, mnist_dir, rng, copy_audio)
            chosen = [r for r in recordings if (r[3] in TEST_TAKES) == (split == "test")]
            manifests[path.name] = [
                row for r in chosen for row in plan.rows(r, images_per_recording)
            ]
            written += plan.written
        commit_manifests(out, manifests)
    items = {split: len(manifests[path.name]) for split, path in paths.items()}
    return {
        "out": str(out),
        "train": str(paths["train"]),
        "test": str(paths["test"]),
        "items": items,
        "images": written,
        "wall_s": round(time.perf_counter() - started, 3),
    }


class _SplitWriter:
    """Rows of one split: images drawn per digit (written once each), audio placed, captions."""

    def __init__(
        self, out: Path, split: str, mnist_dir: str | Path, rng: np.random.Generator, copy: bool
    ) -> None:
        self.out, self.split, self.rng, self.copy = out, split, rng, copy
        self.images, labels = load_mnist(mnist_dir, split)
        self.pools = _ImagePools(labels, rng)
        self.written = 0
        self._done: set[int] = set()  # images written by this build (rewritten on every build)

    def rows(self, recording: tuple[Path, int, str, int], per_recording: int) -> list[dict]:
        path, digit, speaker, take = recording
        audio = _place_audio(path, self.out, self.copy)
        word = DIGIT_WORDS[digit]
        rows = []
        for j in range(per_recording):
            index = self.pools.draw(digit)
            image = f"images/{self.split}-{index:05d}.png"
            if index not in self._done:
                _write_png(self.images[index], self.out / image)
                self._done.add(index)
                self.written += 1
            suffix = f"-{j}" if per_recording > 1 else ""
            rows.append(
                {
                    "id": f"{digit}_{speaker}_{take}{suffix}",
                    "image": image,
                    "audio": audio,
                    "text": CAPTIONS[int(self.rng.integers(len(CAPTIONS)))].format(word),
                    "label": word,
                    "digit": digit,
                    "speaker": speaker,
                    "take": take,
                }
            )
        return rows


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
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)  # a torn copy differs in size and is copied again
    return f"audio/{path.name}"


def _write_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG")
