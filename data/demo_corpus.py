"""The built-in demo corpus, from pip-installable sources only.

Images: scikit-learn's bundled handwritten digits (1,797 8x8 images, upscaled to 32x32 PNG).
Audio: the digit's word spoken by eSpeak NG (``espeakng-loader``), with voice, speed and pitch
varied per item so no two clips of a digit are trivially identical. Text: a caption naming the
digit. A fixed held-out split (every 5th item, per digit) goes to ``test.jsonl``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modalign.core.errors import UserInputError

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
    same whatever the number of ``workers`` synthesising speech in parallel.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserInputError(
            "the demo corpus needs scikit-learn: pip install 'modalign[demo]'"
        ) from None
    from PIL import Image

    from modalign.data.speech import available_voices

    started = time.perf_counter()
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    n = len(digits.target) if limit is None else min(limit, len(digits.target))
    rng = np.random.default_rng(seed)
    voices = available_voices()
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    jobs = []
    seen_per_digit = [0] * 10
    for i in range(n):
        label = int(digits.target[i])
        word = DIGIT_WORDS[label]
        item_id = f"digit-{i:04d}"
        img = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img, mode="L").resize((32, 32), Image.BILINEAR).save(
            root / "images" / f"{item_id}.png"
        )
        voice = voices[int(rng.integers(len(voices)))]
        jobs.append(
            (
                str(root / "audio" / f"{item_id}.wav"),
                word,
                voice,
                int(rng.integers(120, 230)),
                int(rng.integers(20, 80)),
                float(rng.uniform(0.3, 0.9)),
            )
        )
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
    chunks = [(jobs[w::workers], sample_rate) for w in range(max(1, workers))]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_synthesize_chunk, chunks)
    else:
        _synthesize_chunk(chunks[0])
    for split, split_rows in rows.items():
        tmp = root / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in split_rows))
        tmp.replace(root / f"{split}.jsonl")
    return DemoCorpus(
        root, root / "train.jsonl", root / "test.jsonl", n, time.perf_counter() - started
    )


def _synthesize_chunk(args: tuple[list[tuple[str, str, str, int, int, float]], int]) -> None:
    """Speak each job's word and write it as 16-bit WAV (one synthesizer per process)."""
    import io

    import soundfile as sf

    from modalign.data.decode import resample
    from modalign.data.speech import SpeechSynthesizer

    jobs, sample_rate = args
    with SpeechSynthesizer() as tts:
        for path, word, voice, rate, pitch, level in jobs:
            wave = resample(
                tts.synthesize(word, voice=voice, rate=rate, pitch=pitch),
                tts.sample_rate,
                sample_rate,
            )
            wave = wave * (level / max(float(np.abs(wave).max()), 1e-6))
            buf = io.BytesIO()  # soundfile fsyncs real files on close: write via memory instead
            sf.write(buf, wave.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
            Path(path).write_bytes(buf.getvalue())
