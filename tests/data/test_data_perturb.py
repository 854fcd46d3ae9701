"""Built-in robustness perturbations: seeded, clamped to each modality's valid input range."""

from __future__ import annotations

import torch

from modalign.data.modality import ImagePreset, modality_specs

from helpers.data import small_config


def _specs():
    preset = ImagePreset(input_size=8, mean=(0.5,), std=(0.25,))
    return modality_specs(["image", "audio", "text"], small_config(), {"image": preset})


def test_image_noise_stays_in_the_normalised_pixel_range() -> None:
    spec = _specs()["image"]
    x = torch.zeros(4, 1, 8, 8)  # normalised grey
    noisy = spec.perturb(x, 5.0, torch.Generator().manual_seed(0))
    assert float(noisy.min()) == -2.0 and float(noisy.max()) == 2.0  # (0-.5)/.25, (1-.5)/.25
    again = spec.perturb(x, 5.0, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again) and spec.perturb(x, 0.0, torch.Generator()) is x
    small = spec.perturb(x, 0.1, torch.Generator().manual_seed(1))
    assert 0.05 < float(small.std()) < 0.15  # level = standard deviations of the normalisation


def test_audio_noise_is_relative_to_rms_and_clipped() -> None:
    spec = _specs()["audio"]
    t = torch.arange(4000) / 8000
    x = torch.stack(
        [0.5 * torch.sin(2 * torch.pi * 440 * t), 0.05 * torch.sin(2 * torch.pi * 440 * t)]
    )
    noisy = spec.perturb(x, 1.0, torch.Generator().manual_seed(0))
    noise_rms = (noisy - x).pow(2).mean(dim=-1).sqrt()
    signal_rms = x.pow(2).mean(dim=-1).sqrt()
    assert torch.allclose(noise_rms / signal_rms, torch.ones(2), atol=0.1)  # 0 dB SNR
    loud = spec.perturb(x, 50.0, torch.Generator().manual_seed(0))
    assert float(loud.abs().max()) == 1.0


def test_text_word_dropout() -> None:
    spec = _specs()["text"]
    texts = ["a handwritten seven on paper", "one"]
    assert spec.perturb(texts, 0.0, torch.Generator()) is texts
    all_gone = spec.perturb(texts, 1.0, torch.Generator().manual_seed(0))
    assert [len(t.split()) for t in all_gone] == [1, 1] and all_gone[1] == "one"
    some = spec.perturb(texts * 20, 0.5, torch.Generator().manual_seed(0))
    kept = sum(len(t.split()) for t in some[::2]) / (20 * 5)
    assert 0.3 < kept < 0.7 and all(set(t.split()) <= set(texts[0].split()) for t in some[::2])


def test_clamp_is_each_modality_valid_input_range() -> None:
    """``ModalitySpec.clamp`` (what FGSM/PGD project onto): normalised pixel range for images,
    full scale for audio, identity for text (no range)."""
    specs = _specs()
    big = torch.linspace(-5, 5, 4 * 64).view(4, 1, 8, 8)
    img = specs["image"].clamp(big)
    assert float(img.min()) == -2.0 and float(img.max()) == 2.0
    inside = torch.full((1, 1, 8, 8), 0.3)
    assert torch.equal(specs["image"].clamp(inside), inside)
    wave = specs["audio"].clamp(torch.tensor([[-3.0, -0.5, 0.5, 3.0]]))
    assert wave.tolist() == [[-1.0, -0.5, 0.5, 1.0]]
    texts = ["a b"]
    assert specs["text"].clamp(texts) is texts
