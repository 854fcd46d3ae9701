"""Reference client for a modalign ONNX export: numpy + onnxruntime + tokenizers (+ Pillow to
decode images), no torch and no modalign import.

It reads ``export.json`` (written by ``modalign export --format onnx``), prepares raw inputs the
way it states (image resize / crop / normalisation, WAV decode / crop / pad, the tokenizer file
beside the graph) and runs each modality's graph::

    python scripts/onnx_client.py EXPORT_DIR --text "a handwritten seven" --image 7.png \\
        --audio seven.wav

prints one line per input (modality, value, the first embedding values) and, given inputs of
two modalities, their cosine similarities. As a library: ``OnnxClient(EXPORT_DIR).embed(
"image", ["7.png"])`` -> ``(n, embed_dim)`` float32, L2-normalised.

Covered: ``tensor`` feeds of the built-in image and audio modalities (audio: PCM WAV at the
export's sample rate; the log-mel front end of timm audio towers is inside the graph), other
tensor modalities from ``.npy`` files holding the prepared array, ``tokenizer`` feeds (the
``tokenizers`` file), and ``hf_feature_extractor`` feeds of Wav2Vec2-style extractors (zero-mean
unit-variance per clip). Not covered: open_clip's own BPE tokenizer (``open_clip_tokenizer``
feeds need ``open_clip.tokenizer.SimpleTokenizer``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

INTERPOLATION = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _bytes(source: str | bytes | Path) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def prepare_image(source: str | bytes | Path, pre: dict[str, Any]) -> np.ndarray:
    """Decode + eval transform as ``export.json`` states -> (C, H, W) float32."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(_bytes(source))) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode == "I":
            arr = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
            img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float64) * 255.0
            img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
        img = img.convert("L" if pre["channels"] == 1 else "RGB")
    w, h = img.size
    short_to = int(pre["resize_shorter_to"])
    if w <= h:
        size = (short_to, int(short_to * h / w))
    else:
        size = (int(short_to * w / h), short_to)
    img = img.resize(size, INTERPOLATION[pre["interpolation"]])
    crop = int(pre["center_crop"])
    if min(img.size) < crop:
        raise ValueError(f"image resized to {img.size} is smaller than the {crop} px crop")
    left = round((img.size[0] - crop) / 2.0)
    top = round((img.size[1] - crop) / 2.0)
    img = img.crop((left, top, left + crop, top + crop))
    arr = np.asarray(img, dtype=np.float32) * np.float32(pre["scale"])
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    mean = np.asarray(pre["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(pre["std"], dtype=np.float32)[:, None, None]
    return ((arr - mean) / std).astype(np.float32)


def read_wav(source: str | bytes | Path) -> tuple[np.ndarray, int]:
    """A PCM WAV (8/16/24/32-bit) -> mono float32 in [-1, 1] and its sample rate."""
    with wave.open(io.BytesIO(_bytes(source))) as w:
        rate, width, chans = w.getframerate(), w.getsampwidth(), w.getnchannels()
        raw = w.readframes(w.getnframes())
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8
        data = ints.astype(np.float32) / float(1 << 23)
    else:
        kind = {2: np.int16, 4: np.int32}[width]
        data = np.frombuffer(raw, kind).astype(np.float32) / float(np.iinfo(kind).max + 1)
    data = data.reshape(-1, chans)
    return (data.mean(axis=1) if chans > 1 else data[:, 0]).astype(np.float32), rate


def crop_or_pad(x: np.ndarray, length: int) -> np.ndarray:
    """Centre crop, or symmetric zero padding (the extra sample on the right)."""
    n = x.shape[0]
    if n > length:
        start = (n - length) // 2
        return x[start : start + length]
    if n < length:
        left = (length - n) // 2
        return np.pad(x, (left, length - n - left))
    return x


def prepare_audio(source: str | bytes | Path, pre: dict[str, Any]) -> np.ndarray:
    """Decode + crop/pad as ``export.json`` states -> (clip_samples,) float32."""
    x, rate = read_wav(source)
    if rate != int(pre["sample_rate"]):
        raise ValueError(
            f"{source}: {rate} Hz, the model takes {pre['sample_rate']} Hz; resample it first "
            "(this client does not resample)"
        )
    return crop_or_pad(x, int(pre["clip_samples"]))


class OnnxClient:
    """The graphs of one export, each with the input preparation ``export.json`` states."""

    def __init__(self, root: str | Path, threads: int = 0) -> None:
        self.root = Path(root)
        self.meta = json.loads((self.root / "export.json").read_text(encoding="utf-8"))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {
            m: ort.InferenceSession(
                str(self.root / g["file"]), opts, providers=["CPUExecutionProvider"]
            )
            for m, g in self.meta["graphs"].items()
        }
        self._tokenizers: dict[str, Any] = {}

    def feed(self, modality: str, values: Sequence[Any]) -> dict[str, np.ndarray]:
        """Raw values (file paths / bytes; text strings) -> the graph's named inputs."""
        graph = self.meta["graphs"][modality]
        feed, pre = graph["feed"], graph.get("preprocessing", {})
        kind = feed["kind"]
        if kind == "tokenizer":
            if modality not in self._tokenizers:
                from tokenizers import Tokenizer

                self._tokenizers[modality] = Tokenizer.from_file(str(self.root / feed["file"]))
            texts = [str(v).strip() for v in values]
            enc = self._tokenizers[modality].encode_batch(texts)
            return {
                name: np.asarray([getattr(e, field) for e in enc], dtype=np.int64)
                for name, field in feed["outputs"].items()
            }
        if kind == "tensor":
            if "resize_shorter_to" in pre:
                arr = np.stack([prepare_image(v, pre) for v in values])
            elif "clip_samples" in pre:
                arr = np.stack([prepare_audio(v, pre) for v in values])
            else:  # another modality: the prepared array, saved with numpy
                arr = np.stack([np.load(str(v), allow_pickle=False) for v in values])
            return {feed["input"]: arr.astype(feed.get("dtype", "float32"))}
        if kind == "hf_feature_extractor":
            return self._extractor_feed(feed, pre, values)
        raise ValueError(f"{modality}: input feed {kind!r} is not covered by this client")

    def _extractor_feed(self, feed: dict[str, Any], pre: dict[str, Any], values: Sequence[Any]):
        cfg = json.loads(
            (self.root / feed["dir"] / "preprocessor_config.json").read_text(encoding="utf-8")
        )
        if cfg.get("feature_extractor_type") != "Wav2Vec2FeatureExtractor":
            raise ValueError(
                f"feature extractor {cfg.get('feature_extractor_type')!r}: not covered"
            )
        if int(feed["source_rate"]) != int(feed["rate"]):
            raise ValueError("the extractor's rate differs from the data rate: resample first")
        waves = np.stack([prepare_audio(v, pre) for v in values]).astype(np.float32)
        if cfg.get("do_normalize", True):
            mean = waves.mean(axis=1, keepdims=True)
            var = waves.var(axis=1, keepdims=True)
            waves = (waves - mean) / np.sqrt(var + 1e-7)
        out = {"input_values": waves.astype(np.float32)}
        if "attention_mask" in feed["inputs"]:
            out["attention_mask"] = np.ones(waves.shape, dtype=np.int64)
        return {n: out[n] for n in feed["inputs"]}

    def embed(self, modality: str, values: Sequence[Any]) -> np.ndarray:
        """(n, embed_dim) float32 L2-normalised embeddings of raw ``values``."""
        name = self.meta["graphs"][modality]["output"]["name"]
        (out,) = self.sessions[modality].run([name], self.feed(modality, list(values)))
        return np.asarray(out, dtype=np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="folder written by `modalign export --format onnx`")
    p.add_argument("--text", action="append", default=[])
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--audio", action="append", default=[])
    p.add_argument("--input", action="append", default=[], metavar="MODALITY=FILE")
    args = p.parse_args(argv)
    client = OnnxClient(args.export)
    asked: dict[str, list[str]] = {"text": args.text, "image": args.image, "audio": args.audio}
    for pair in args.input:
        m, _, v = pair.partition("=")
        asked.setdefault(m, []).append(v)
    embs = {m: client.embed(m, vs) for m, vs in asked.items() if vs}
    for m, e in embs.items():
        for v, row in zip(asked[m], e, strict=True):
            print(f"{m}\t{v}\t" + " ".join(f"{x:+.4f}" for x in row[:6]) + " ...")
    mods = list(embs)
    for i, a in enumerate(mods):
        for b in mods[i + 1 :]:
            sims = embs[a] @ embs[b].T
            print(f"cosine {a} x {b}:\n{np.array2string(sims, precision=3)}")
    return 0 if not math.isnan(sum(float(e.sum()) for e in embs.values())) else 1


if __name__ == "__main__":
    sys.exit(main())
