"""The batched torch log-mel front end equals librosa clip by clip."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from modalign.data.audio import LogMel, SpecAugment
from modalign.data.config import AudioConfig


def librosa_logmel(wave: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    # librosa defaults: center=True, pad_mode="constant", Hann window, Slaney mel, power 2.
    mel = librosa.feature.melspectrogram(
        y=wave,
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
    )
    return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=cfg.top_db)


@pytest.mark.parametrize(
    "cfg",
    [
        AudioConfig(),
        AudioConfig(sample_rate=8000, n_fft=256, hop_length=128, n_mels=16, f_min=20.0, f_max=3000),
    ],
)
def test_logmel_equals_librosa_to_1e4_db(cfg: AudioConfig) -> None:
    rng = np.random.default_rng(0)
    n = cfg.clip_samples
    t = np.arange(n) / cfg.sample_rate
    clips = np.stack(
        [
            0.3 * rng.standard_normal(n),
            0.5 * np.sin(2 * np.pi * 440 * t),
            1e-4 * rng.standard_normal(n),  # quiet clip: the per-clip top_db floor matters
            np.concatenate([np.zeros(n // 2), 0.2 * rng.standard_normal(n - n // 2)]),
        ]
    ).astype(np.float32)
    front = LogMel(cfg)
    ours = front(torch.from_numpy(clips)).squeeze(1).numpy()
    for clip, got in zip(clips, ours):
        ref = librosa_logmel(clip, cfg)
        assert got.shape == ref.shape
        assert np.max(np.abs(got - ref)) <= 1e-4


def test_spec_augment_masks_in_train_only() -> None:
    spec = torch.randn(4, 1, 32, 50)
    aug = SpecAugment(freq_mask=8, time_mask=10)
    torch.manual_seed(0)
    out = aug.train()(spec)
    assert out.shape == spec.shape and not torch.equal(out, spec)
    assert torch.equal(aug.eval()(spec), spec)
