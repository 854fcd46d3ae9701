"""Decoders against bad input: every problem is one BadItem with a reason, never a crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modalign.data import decode
from modalign.data.config import ImageConfig
from modalign.data.decode import BadItem, decode_audio, decode_image, decode_text, read_audio

from helpers.data import jpeg_bytes, png_bomb, png_bytes, small_config, wav_bytes


def reason(fn, *args) -> str:
    with pytest.raises(BadItem) as info:
        fn(*args)
    return info.value.reason


def test_missing_and_zero_byte_files(tmp_path: Path) -> None:
    cfg = small_config()
    (tmp_path / "empty.png").write_bytes(b"")
    assert reason(decode_image, tmp_path / "nope.png", cfg.image) == "missing_file"
    assert reason(decode_image, tmp_path / "empty.png", cfg.image) == "empty_file"
    assert reason(decode_audio, tmp_path / "nope.wav", cfg.audio) == "missing_file"
    assert reason(decode_audio, b"", cfg.audio) == "empty_file"
    assert reason(decode_image, tmp_path, cfg.image) == "unreadable_file"  # a directory


def test_truncated_jpeg_is_bad_not_silently_grey() -> None:
    data = jpeg_bytes(64)
    assert decode_image(data, ImageConfig()).size == (64, 64)
    assert reason(decode_image, data[: len(data) // 2], ImageConfig()) == "corrupt_image"


def test_png_decompression_bomb_rejected_from_header() -> None:
    assert reason(decode_image, png_bomb(), ImageConfig()) == "image_too_large"
    small_limit = ImageConfig(max_pixels=100)
    assert reason(decode_image, png_bytes(size=16), small_limit) == "image_too_large"


def test_wav_with_bad_header() -> None:
    data = bytearray(wav_bytes())
    data[0:4] = b"RIFX"  # big-endian RIFF marker with little-endian body
    data[8:12] = b"WAVX"
    assert reason(decode_audio, bytes(data), small_config().audio) == "unreadable_audio"


def test_silent_and_nan_audio() -> None:
    cfg = small_config().audio
    assert reason(decode_audio, wav_bytes(np.zeros(4000)), cfg) == "silent_audio"
    wave = np.full(4000, 0.1, dtype=np.float32)
    wave[100] = np.nan
    assert reason(decode_audio, wav_bytes(wave, subtype="FLOAT"), cfg) == "nan_audio"


def test_wrong_sample_rate_is_resampled_not_bad() -> None:
    cfg = small_config().audio  # 8 kHz, 0.5 s
    t = np.arange(22050) / 22050
    out = decode_audio(wav_bytes(0.5 * np.sin(2 * np.pi * 440 * t), sr=22050), cfg)
    assert out.shape == (cfg.clip_samples,) and out.dtype == np.float32
    peak_bin = np.argmax(np.abs(np.fft.rfft(out)))
    assert abs(peak_bin * cfg.sample_rate / len(out) - 440) < 5  # still a 440 Hz tone


def test_unknown_extension_gets_its_own_reason(tmp_path: Path) -> None:
    cfg = small_config()
    (tmp_path / "clip.xyz").write_bytes(b"not audio at all")
    (tmp_path / "clip.wav").write_bytes(b"not audio at all")
    assert reason(decode_audio, tmp_path / "clip.xyz", cfg.audio) == "unknown_extension"
    assert reason(decode_audio, tmp_path / "clip.wav", cfg.audio) == "unreadable_audio"
    (tmp_path / "img.xyz").write_bytes(png_bytes())  # content decides when it decodes
    assert decode_image(tmp_path / "img.xyz", cfg.image).size == (16, 16)


def test_mp3_decodes(tmp_path: Path) -> None:
    path = tmp_path / "tone.mp3"
    path.write_bytes(wav_bytes(fmt="MP3", subtype="MPEG_LAYER_III"))
    wave, sr = read_audio(path)
    assert sr == 8000 and wave.size > 3000
    assert decode_audio(path.read_bytes(), small_config().audio).shape == (4000,)


def test_mp3_falls_back_to_librosa_when_soundfile_cannot(monkeypatch, tmp_path: Path) -> None:
    import librosa

    def no_soundfile(data: bytes) -> tuple[np.ndarray, int]:
        raise RuntimeError("format not supported")

    calls = []

    def fake_load(path: str, sr=None, mono=True):
        calls.append(path)
        return np.full(800, 0.2, dtype=np.float32), 8000

    monkeypatch.setattr(decode, "_read_soundfile", no_soundfile)
    monkeypatch.setattr(librosa, "load", fake_load)
    (tmp_path / "a.mp3").write_bytes(b"ID3 fake")
    assert read_audio(tmp_path / "a.mp3")[1] == 8000
    assert read_audio(b"ID3\x04 fake")[1] == 8000  # bytes from a shard: sniffed, temp file
    assert len(calls) == 2
    assert reason(read_audio, b"RIFF not a wav") == "unreadable_audio"  # no fallback for WAV


def test_text_decoder() -> None:
    assert decode_text(b" hi ") == "hi"
    assert decode_text(3) == "3"
    for value in ("  ", None, float("nan")):
        assert reason(decode_text, value) == "empty_text"
