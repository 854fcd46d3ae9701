"""The built-in demo corpus, from pip-installable sources only.

Images: scikit-learn's bundled handwritten digits (1,797 8x8 images, upscaled to 32x32 PNG).
Audio: the digit's word spoken by eSpeak NG (``espeakng-loader``), with voice, speed and pitch
varied per item so no two clips of a digit are trivially identical. Text: a caption naming the
digit. A fixed held-out split (every 5th item, per digit) goes to ``test.jsonl``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalign.core.errors import UserInputError
from modalign.data.corpora.files import commit_manifests, corpus_folder

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = (
    "a handwritten {}",
    "the digit {}",
    "the number {}",
    "someone says {}",
    "{} written by hand",
    "a spoken and written {}",
)


@dataclass
class DemoCorpus:
    root: Path
    train: Path
    test: Path
    items: int
    seconds: float


def build_demo_corpus(
    out: str | Path,
    seed: int = 0,
    sample_rate: int = 16000,
    limit: int | None = None,
    workers: int = 2,
) -> DemoCorpus:
    """Write PNG images, WAV clips and ``train.jsonl``/``test.jsonl`` into ``out``.

    Voice, rate, pitch, gain and caption are drawn up front from ``seed``, so the corpus is the
    same whatever the number of ``workers`` synthesising speech in parallel. Written under the
    :mod:`modalign.data.corpora.files` protocol: locked, old manifests removed first, new ones
    written atomically last, so a manifest only names complete files.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserInputError(
            "the demo corpus needs scikit-learn: pip install 'modalign[demo]'"
        ) from None

    started = time.perf_counter()
    root = Path(out)
    with corpus_folder(root, ["train.jsonl", "test.jsonl"], "demo corpus"):
        digits = load_digits()
        n = len(digits.target) if limit is None else min(limit, len(digits.target))
        rows, jobs = _plan(root, digits, n, np.random.default_rng(seed))
        synthesize_words(jobs, sample_rate, workers)
        commit_manifests(root, {f"{split}.jsonl": split_rows for split, split_rows in rows.items()})
    return DemoCorpus(
        root, root / "train.jsonl", root / "test.jsonl", n, time.perf_counter() - started
    )


Job = tuple[str, str, str, int, int, float]  # wav path, word, voice, rate, pitch, level


def _plan(root: Path, digits: Any, n: int, rng: np.random.Generator) -> tuple[dict, list[Job]]:
    """Write the images; draw each item's voice, speed, pitch, gain, caption and split."""
    from modalign.data.corpora.speech import available_voices

    voices = available_voices()
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    jobs: list[Job] = []
    seen_per_digit = [0] * 10
    for i in range(n):
        label = int(digits.target[i])
        word = DIGIT_WORDS[label]
        item_id = f"digit-{i:04d}"
        _write_digit_png(digits.images[i], root / "images" / f"{item_id}.png")
        voice = voices[int(rng.integers(len(voices)))]
        rate, pitch = int(rng.integers(120, 230)), int(rng.integers(20, 80))
        level = float(rng.uniform(0.3, 0.9))
        jobs.append((str(root / "audio" / f"{item_id}.wav"), word, voice, rate, pitch, level))
        split = "test" if seen_per_digit[label] % 5 == 4 else "train"
        seen_per_digit[label] += 1
        caption = CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(word)
        rows[split].append(
            {
                "id": item_id,
                "image": f"images/{item_id}.png",
                "audio": f"audio/{item_id}.wav",
                "text": caption,
                "label": word,
            }
        )
    return rows, jobs


def _write_digit_png(image: np.ndarray, path: Path) -> None:
    """An 8x8 sklearn digit (0..16) as a 32x32 greyscale PNG."""
    from PIL import Image

    img = (image * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="L").resize((32, 32), Image.Resampling.BILINEAR).save(
        path, format="PNG"
    )


def synthesize_words(jobs: list[Job], sample_rate: int, workers: int) -> None:
    """Speak every ``(wav path, text, voice, rate, pitch, level)`` job into a 16-bit WAV file.

    ``workers`` processes (spawned) share the jobs; each job's output depends only on its own
    arguments (see :class:`~modalign.data.corpora.speech.SpeechSynthesizer`), so the files are the same
    whatever the number of workers. The files are not fsynced: the caller makes them durable
    (:func:`~modalign.data.corpora.files.commit_manifests`).
    """
    chunks = [(jobs[w::workers], sample_rate) for w in range(max(1, workers))]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_synthesize_chunk, chunks)
    else:
        _synthesize_chunk(chunks[0])


def _synthesize_chunk(args: tuple[list[Job], int]) -> None:
    """Speak each job's word and write it as 16-bit WAV (one synthesizer per process)."""
    import io

    import soundfile as sf

    from modalign.data.corpora.speech import SpeechSynthesizer
    from modalign.data.decode import resample

    jobs, sample_rate = args
    with SpeechSynthesizer() as tts:
        for path, word, voice, rate, pitch, level in jobs:
            wave = resample(
                tts.synthesize(word, voice=voice, rate=rate, pitch=pitch),
                tts.sample_rate,
                sample_rate,
            )
            wave = wave * (level / max(float(np.abs(wave).max()), 1e-6))
            buf = io.BytesIO()
            sf.write(buf, wave.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(buf.getvalue())  # made durable by commit_manifests
