"""Log-mel front end: batched torch (LogMel) vs librosa clip by clip, speed and agreement.

    python scripts/bench_audio_frontend.py [--clips 1024] [--batch 256] [--threads 2]

Clips: 1 s at 16 kHz (noise, tones, quiet and half-silent clips). Prints a markdown table of
clips/s and the max |dB| difference to ``librosa.power_to_db(melspectrogram(...))``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def make_clips(n: int, sr: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(sr) / sr
    clips = np.empty((n, sr), dtype=np.float32)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            clips[i] = 0.3 * rng.standard_normal(sr)
        elif kind == 1:
            clips[i] = 0.5 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        elif kind == 2:
            clips[i] = 1e-4 * rng.standard_normal(sr)
        else:
            clips[i, sr // 2 :] = 0.2 * rng.standard_normal(sr - sr // 2)
    return clips


def librosa_logmel(wave: np.ndarray, cfg) -> np.ndarray:
    import librosa

    mel = librosa.feature.melspectrogram(
        y=wave, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels,
        fmin=cfg.f_min, fmax=cfg.f_max,
    )  # fmt: skip
    return librosa.power_to_db(mel, top_db=cfg.top_db)


def torch_rate(front, clips: torch.Tensor, batch: int, repeats: int) -> float:
    with torch.inference_mode():
        front(clips[:batch])  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            for lo in range(0, len(clips), batch):
                front(clips[lo : lo + batch])
    return repeats * len(clips) / (time.perf_counter() - start)


def main() -> None:
    from modalign.data.audio import LogMel
    from modalign.data.config import AudioConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--librosa-clips", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = AudioConfig()  # 16 kHz, n_fft 400, hop 160, 64 mels
    clips = make_clips(args.clips, cfg.sample_rate)
    batch = torch.from_numpy(clips)
    n_ref = min(args.librosa_clips, args.clips)
    start = time.perf_counter()
    refs = [librosa_logmel(c, cfg) for c in clips[:n_ref]]
    librosa_rate = n_ref / (time.perf_counter() - start)
    rows = [("librosa, per clip", librosa_rate, 0.0)]
    for precision in ("float64", "float32"):
        front = LogMel(cfg, precision=precision)
        rate = torch_rate(front, batch, args.batch, args.repeats)
        with torch.inference_mode():
            ours = front(batch[:n_ref]).squeeze(1).numpy()
        diff = max(float(np.abs(o - r).max()) for o, r in zip(ours, refs))
        rows.append((f"torch LogMel, batch {args.batch}, {precision}", rate, diff))
    print(f"\nload average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
          f"torch threads {args.threads}\n")  # fmt: skip
    print(
        "| front end (1 s @ 16 kHz, 64 mels) | clips/s | speed-up | max abs diff vs librosa (dB) |"
    )
    print("|---|---|---|---|")
    for name, rate, diff in rows:
        print(f"| {name} | {rate:.0f} | {rate / librosa_rate:.1f}x | {diff:.2e} |")


if __name__ == "__main__":
    main()
