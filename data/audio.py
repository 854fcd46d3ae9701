"""Log-mel front end, batched in torch on the training device.

Values equal ``librosa.power_to_db(librosa.feature.melspectrogram(...))`` per clip (same STFT
framing: centred, zero padded; periodic Hann window; librosa's Slaney mel filterbank; power 2;
per-clip ``top_db`` floor) to within 1e-5 dB, but one batched ``torch.stft`` is much faster than
librosa clip by clip, so this runs in the model, not in data workers.

Precision: the STFT runs in float64 by default. In float32, FFT rounding reaches ~3e-4 dB in
mel bins 60 dB or more below a clip's peak (pure tones), which breaks exact parity with librosa
(librosa's own float32 path stays within 1e-5 dB of float64). ``precision="float32"`` trades
that for speed; the output is float32 either way.
"""

from __future__ import annotations

import torch
from torch import nn

from modalign.data.config import AudioConfig
from modalign.data.item_keys import current_item_keys, item_generators


class LogMel(nn.Module):
    """(B, T) waveform -> (B, 1, n_mels, frames) log-mel power in dB (per-clip ``top_db`` floor)."""

    mel_basis: torch.Tensor  # buffers, registered in __init__
    window: torch.Tensor

    def __init__(self, cfg: AudioConfig, amin: float = 1e-10, precision: str = "float64") -> None:
        super().__init__()
        import librosa

        if precision not in ("float64", "float32"):
            raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
        self.n_fft, self.hop, self.top_db, self.amin = cfg.n_fft, cfg.hop_length, cfg.top_db, amin
        self.compute_dtype = torch.float64 if precision == "float64" else torch.float32
        # librosa's float32 filterbank values, held exactly in float64 (librosa upcasts the same).
        fb = librosa.filters.mel(
            sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max
        )
        # Buffers (not parameters): they move with .to(device) but are not trained or saved.
        # Built in float64 (a float32 window alone costs ~1e-4 dB in quiet bins); .to(dtype)
        # casts of the module are undone in forward, which casts to the compute dtype.
        self.register_buffer("mel_basis", torch.from_numpy(fb).double(), persistent=False)
        self.register_buffer(
            "window",
            torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64),
            persistent=False,
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        out_dtype = torch.float64 if wave.dtype == torch.float64 else torch.float32
        dtype = torch.float64 if wave.dtype == torch.float64 else self.compute_dtype
        if wave.device.type == "mps":  # Apple GPUs have no float64
            dtype = out_dtype = torch.float32
        wave = wave.to(dtype)
        spec = torch.stft(
            wave,
            self.n_fft,
            hop_length=self.hop,
            window=self.window.to(dtype),
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(self.mel_basis.to(dtype), power)
        db = 10.0 * torch.log10(torch.clamp(mel, min=self.amin))
        if self.top_db is not None:
            floor = db.amax(dim=(-2, -1), keepdim=True) - self.top_db
            db = torch.maximum(db, floor)
        return db.to(out_dtype).unsqueeze(1)


class SpecAugment(nn.Module):
    """Time and frequency masking (Park et al. 2019); identity in eval mode.

    Each row's mask widths and positions come from that row's item key
    (:func:`~modalign.data.item_keys.current_item_keys`, set by the training step from
    ``Batch.keys``), so a row is masked the same whichever process and batch it lands in, and
    a resumed run masks as the uninterrupted one. ``keys`` may also be passed directly; with
    none set, the process RNG is used (not reproducible across process layouts).
    """

    SALT = 0x5BEC  # tells SpecAugment's draws from other model-side augmentations of a row

    def __init__(self, freq_mask: int, time_mask: int) -> None:
        super().__init__()
        self.freq_mask, self.time_mask = freq_mask, time_mask

    def forward(self, spec: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return spec
        keys = current_item_keys() if keys is None else keys
        b, _, n_freq, n_time = spec.shape
        if keys is not None and len(keys) != b:
            raise ValueError(f"SpecAugment: {len(keys)} item keys for a batch of {b} rows")
        sizes = ((self.freq_mask, n_freq), (self.time_mask, n_time))
        draws = _draws(b, sizes, keys, spec.device)  # (b, 2 axes, 2: width, start)
        out = spec.clone()
        fill = spec.mean(dim=(-2, -1), keepdim=True)
        for axis, ((size, axis_len), dim) in enumerate(zip(sizes, (-2, -1), strict=True)):
            if size <= 0:
                continue
            width, start = draws[:, axis, 0].view(b, 1, 1, 1), draws[:, axis, 1].view(b, 1, 1, 1)
            idx = torch.arange(axis_len, device=spec.device)
            idx = idx.view(1, 1, -1, 1) if dim == -2 else idx.view(1, 1, 1, -1)
            mask = (idx >= start) & (idx < start + width)
            out = torch.where(mask, fill, out)
        return out


def _draws(
    b: int, sizes: tuple[tuple[int, int], ...], keys: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """(b, axes, 2) long: each axis's mask width in [0, size] and start in [0, len - width]."""
    if keys is None:
        cols = []
        for size, axis_len in sizes:
            if size <= 0:  # no draw: the process RNG stream stays as it was
                cols.append(torch.zeros(b, 2, dtype=torch.long, device=device))
                continue
            width = torch.randint(0, size + 1, (b,), device=device)
            start = (torch.rand(b, device=device) * (axis_len - width + 1)).long()
            cols.append(torch.stack([width, start], dim=1))
        return torch.stack(cols, dim=1)
    rows = []
    for gen in item_generators(keys, SpecAugment.SALT):
        row = []
        for size, axis_len in sizes:
            if size <= 0:
                row.append((0, 0))
                continue
            w = int(torch.randint(0, size + 1, (), generator=gen))
            row.append((w, int(float(torch.rand((), generator=gen)) * (axis_len - w + 1))))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long, device=device).view(b, len(sizes), 2)
