"""The decoded-item cache: same batches as without it, each item decoded once, keys that miss
when a file or a decode setting changes, damaged disk entries recovered, bad items never kept."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modalign.core.errors import ConfigError, UserInputError
from modalign.data.batch import Batch, DecodeCounts
from modalign.data.cache import (
    DiskCache,
    MemoryCache,
    cache_entry,
    load_value,
    open_cache,
)
from modalign.data.config import CacheSpec, DataConfig, cache_spec
from modalign.data.modality import ImagePreset, ModalitySpec, default_modalities
from modalign.data.sources import open_stream

ITEMS, BATCH = 12, 4  # 3 batches per epoch


def _config(channels: int = 1, sample_rate: int = 8000) -> DataConfig:
    cfg = DataConfig()
    cfg.image.channels, cfg.image.hflip, cfg.image.train_scale_min = channels, 0.5, 0.3
    cfg.audio.sample_rate, cfg.audio.clip_seconds = sample_rate, 0.5
    return cfg


def _specs(cfg: DataConfig | None = None) -> dict[str, ModalitySpec]:
    return default_modalities(cfg or _config(), ImagePreset(input_size=16))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Images of several sizes; clips short and long, at the target rate and resampled, mono
    and stereo; captions."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    (root / "img").mkdir(parents=True)
    (root / "wav").mkdir()
    rows = []
    for i in range(ITEMS):
        pixels = rng.integers(0, 255, (18 + i, 22, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        sr, seconds, channels = (16000 if i % 2 else 8000), (1.3 if i % 3 else 0.3), 1 + i % 2
        wave = 0.3 * rng.standard_normal((int(sr * seconds), channels))
        sf.write(root / "wav" / f"{i}.wav", wave.astype(np.float32), sr)
        rows.append({"id": f"r{i}", "image": f"img/{i}.png", "audio": f"wav/{i}.wav",
                     "text": f"item {i}"})  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl"


def _batches(src: Path | str, specs, cache, epochs: int = 3, workers: int = 0) -> list[Batch]:
    stream = open_stream(str(src), specs, BATCH, seed=3, num_workers=workers, cache=cache)
    it = iter(stream)
    return [next(it) for _ in range(epochs * ITEMS // BATCH)]


def _assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.ids == y.ids and torch.equal(x.keys, y.keys)
        assert set(x.inputs) == set(y.inputs) == {"image", "audio", "text"}
        for m, value in x.inputs.items():
            other = y.inputs[m]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"{m} differs in batch {x.ids}"


def _epoch_counts(batches: list[Batch], epoch: int) -> DecodeCounts:
    total = DecodeCounts()
    per = ITEMS // BATCH
    for b in batches[epoch * per : (epoch + 1) * per]:
        total.add(b.counts)
    return total


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_cache_gives_the_uncached_batches_and_decodes_each_item_once(
    corpus: Path, tmp_path: Path, kind: str
) -> None:
    specs = _specs()
    plain = _batches(corpus, specs, None)
    cache = open_cache(cache_spec({"kind": kind, "options": {"dir": str(tmp_path / "c")}}
                                  if kind == "disk" else kind))  # fmt: skip
    cached = _batches(corpus, specs, cache)
    _assert_same(plain, cached)  # augmentation on: random crops, flips, audio windows
    assert _epoch_counts(plain, 1).decoded == 2 * ITEMS  # without a cache: every epoch
    first = _epoch_counts(cached, 0)
    assert (first.decoded, first.cache_hits) == (2 * ITEMS, 0)
    for epoch in (1, 2):
        later = _epoch_counts(cached, epoch)
        assert (later.decoded, later.cache_hits) == (0, 2 * ITEMS), epoch
    assert first.cache_corrupt == first.cache_full == first.cache_write_errors == 0


def test_disk_cache_is_shared_by_runs_and_workers(corpus: Path, tmp_path: Path) -> None:
    specs = _specs()
    warm = _batches(corpus, specs, DiskCache(tmp_path / "c"), epochs=1)
    again = _batches(corpus, specs, DiskCache(tmp_path / "c"), epochs=1, workers=2)
    _assert_same(warm, again)
    assert _epoch_counts(again, 0).decoded == 0
    assert _epoch_counts(again, 0).cache_hits == 2 * ITEMS
    entries = list((tmp_path / "c").rglob("*.safetensors"))
    assert len(entries) == 2 * ITEMS  # one file per item and modality
    settings = sorted(json.loads(p.read_text())["settings"] for p in (tmp_path / "c").rglob(
        "settings.json"))  # fmt: skip
    assert settings == ["audio/1 sample_rate=8000 clip_samples=4000",
                        "image/1 channels=1 max_pixels=64000000"]  # fmt: skip


def test_a_changed_decode_setting_or_file_misses(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    _batches(corpus, _specs(), DiskCache(root), epochs=1)
    rgb = _batches(corpus, _specs(_config(channels=3)), DiskCache(root), epochs=1)
    counts = _epoch_counts(rgb, 0)
    assert (counts.decoded, counts.cache_hits) == (ITEMS, ITEMS)  # images miss, audio hits
    assert rgb[0].inputs["image"].shape[1] == 3
    rate = _batches(corpus, _specs(_config(sample_rate=16000)), DiskCache(root), epochs=1)
    assert (_epoch_counts(rate, 0).decoded, _epoch_counts(rate, 0).cache_hits) == (ITEMS, ITEMS)
    flips = _config()
    flips.image.hflip = 0.0  # an augmentation setting: the decoded pixels are still good
    assert _epoch_counts(_batches(corpus, _specs(flips), DiskCache(root), 1), 0).decoded == 0

    from PIL import Image

    image = corpus.parent / "img" / "0.png"
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(image)  # a new file, same path
    redone = _batches(corpus, _specs(), DiskCache(root), epochs=1)
    assert _epoch_counts(redone, 0).decoded == 1
    _assert_same(redone, _batches(corpus, _specs(), None, epochs=1))


def test_damaged_disk_entries_are_counted_decoded_again_and_rewritten(
    corpus: Path, tmp_path: Path
) -> None:
    root = tmp_path / "c"
    specs = _specs()
    _batches(corpus, specs, DiskCache(root), epochs=1)
    files = sorted(root.rglob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:-7])  # truncated (a crash mid-copy)
    data = bytearray(files[1].read_bytes())
    data[-1] ^= 0xFF  # one flipped payload byte: safetensors alone would not notice
    files[1].write_bytes(bytes(data))
    files[2].write_bytes(files[3].read_bytes())  # another item's entry under this name
    files[4].write_bytes(b"")
    got = _batches(corpus, specs, DiskCache(root), epochs=1)
    counts = _epoch_counts(got, 0)
    assert (counts.cache_corrupt, counts.decoded, counts.cache_hits) == (4, 4, 2 * ITEMS - 4)
    _assert_same(got, _batches(corpus, specs, None, epochs=1))
    healed = _epoch_counts(_batches(corpus, specs, DiskCache(root), epochs=1), 0)
    assert (healed.cache_corrupt, healed.decoded) == (0, 0)


def test_bad_items_stay_bad_and_are_never_cached(corpus: Path, tmp_path: Path) -> None:
    (corpus.parent / "img" / "5.png").write_bytes(b"not a png")
    (corpus.parent / "wav" / "7.wav").unlink()
    cache = MemoryCache()
    batches = _batches(corpus, _specs(), cache)
    for epoch in range(3):
        counts = _epoch_counts(batches, epoch)
        reasons = sorted(r.reason for b in batches[epoch * 3 : epoch * 3 + 3] for r in b.bad)
        assert reasons == ["corrupt_image", "missing_file"], epoch
        assert counts.decoded == (2 * ITEMS if epoch == 0 else 2)  # both tried again
    assert len(cache._items) == 2 * ITEMS - 2


def test_memory_limit_keeps_what_fits_and_counts_the_rest(corpus: Path) -> None:
    specs = _specs()
    cache = MemoryCache(max_bytes=60_000)  # a few clips' worth
    got = _batches(corpus, specs, cache, epochs=2)
    _assert_same(got, _batches(corpus, specs, None, epochs=2))
    assert 0 < cache.used <= 60_000
    kept = len(cache._items)
    assert 0 < kept < 2 * ITEMS
    second = _epoch_counts(got, 1)
    assert (second.cache_hits, second.decoded) == (kept, 2 * ITEMS - kept)
    assert second.cache_full == 2 * ITEMS - kept


def test_shard_stream_with_disk_cache_equals_uncached(corpus: Path, tmp_path: Path) -> None:
    from helpers.data import write_shard

    root = corpus.parent
    samples = [{"__key__": f"k{i}", "png": (root / "img" / f"{i}.png").read_bytes(),
                "wav": (root / "wav" / f"{i}.wav").read_bytes(), "txt": f"item {i}"}
               for i in range(ITEMS)]  # fmt: skip
    pattern = str(tmp_path / "sh-{0..1}.tar")
    write_shard(tmp_path / "sh-0.tar", samples[:6])
    write_shard(tmp_path / "sh-1.tar", samples[6:])
    specs = _specs()
    plain = _batches(pattern, specs, None, epochs=2)
    cached = _batches(pattern, specs, DiskCache(tmp_path / "c"), epochs=2)
    _assert_same(plain, cached)
    assert (_epoch_counts(cached, 0).decoded, _epoch_counts(cached, 1).decoded) == (2 * ITEMS, 0)


def test_shard_bytes_are_keyed_by_content(tmp_path: Path) -> None:
    from helpers.data import png_bytes

    specs = _specs()
    spec = specs["image"]
    a, b = cache_entry(spec, png_bytes(10)), cache_entry(spec, png_bytes(10))
    assert a is not None and a == b
    assert cache_entry(spec, png_bytes(11)) != a
    assert cache_entry(specs["text"], "a caption") is None  # inline: never cached
    assert cache_entry(spec, str(tmp_path / "missing.png")) is None  # decoded (and fails) as usual


def test_specs_that_do_not_split_are_loaded_every_time() -> None:
    calls = []

    def load(value, train, rng):
        calls.append(value)
        return torch.zeros(1)

    spec = ModalitySpec("thing", load, torch.zeros(1))
    cache, counts = MemoryCache(), DecodeCounts()
    for _ in range(3):
        load_value(spec, b"xyz", True, np.random.default_rng(0), cache, counts)
    assert (len(calls), counts.decoded, counts.cache_hits, cache._items) == (3, 3, 0, {})


def test_a_prepare_returning_no_array_is_named() -> None:
    spec = ModalitySpec("thing", lambda v, t, r: v, None, prepare=lambda v: object(),
                        augment=lambda raw, t, r: raw)  # fmt: skip
    with pytest.raises(TypeError, match="modality 'thing': prepare returned object"):
        load_value(spec, b"xyz", False, np.random.default_rng(0), MemoryCache(), DecodeCounts())


def test_kept_values_are_read_only(corpus: Path) -> None:
    spec = _specs()["image"]

    def scribble(pixels, train, rng):
        pixels[0, 0] = 0  # an augment that writes into its input would poison later epochs
        return pixels

    bad = ModalitySpec("image", spec.load, spec.placeholder, prepare=spec.prepare,
                       augment=scribble)  # fmt: skip
    path = str(corpus.parent / "img" / "0.png")
    with pytest.raises(ValueError, match="read-only"):
        load_value(bad, path, True, np.random.default_rng(0), MemoryCache(), DecodeCounts())


def test_audio_prepare_then_augment_equals_load() -> None:
    import soundfile as sf

    spec = _specs(_config(sample_rate=16000))["audio"]
    rng = np.random.default_rng(1)
    for sr, seconds, channels in [(8000, 2.3, 1), (8000, 0.2, 2), (16000, 1.7, 2), (44100, 0.9, 1)]:
        buf = io.BytesIO()
        wave = 0.3 * rng.standard_normal((int(sr * seconds), channels))
        sf.write(buf, wave.astype(np.float32), sr, format="WAV", subtype="PCM_16")
        data = buf.getvalue()
        for train in (True, False):
            for seed in range(3):
                direct = spec.load(data, train, np.random.default_rng(seed))
                split = spec.augment(spec.prepare(data), train, np.random.default_rng(seed))
                assert torch.equal(direct, split), (sr, seconds, channels, train, seed)


def test_cache_config_is_checked_up_front(tmp_path: Path) -> None:
    assert DataConfig().cache == CacheSpec("none") and open_cache(DataConfig().cache) is None
    assert isinstance(open_cache(cache_spec("memory")), MemoryCache)
    with pytest.raises(ConfigError, match="data.cache.kind: unknown item cache 'ram'"):
        cache_spec("ram")
    with pytest.raises(ConfigError, match="data.cache.options.folder"):
        cache_spec({"kind": "disk", "options": {"folder": "x"}})
    with pytest.raises(ConfigError, match=r"data.cache.options.max_bytes=0 is out of range"):
        cache_spec({"kind": "memory", "options": {"max_bytes": 0}})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserInputError, match=r"data.cache.options.dir: .*a-file/sub"):
        open_cache(cache_spec({"kind": "disk", "options": {"dir": str(blocker / "sub")}}))
