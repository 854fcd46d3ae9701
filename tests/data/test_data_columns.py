"""Issue 10 (3, 4, 6, 11, 15): manifest column rules, CSV quotes, 16-bit/EXIF images, symlink
loops and windowed audio decoding, each fed the input that used to go wrong."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from modalign.core.errors import DataError, UserInputError
from modalign.data.config import AudioConfig, ImageConfig
from modalign.data.dataset import PairedDataset
from modalign.data.decode import (
    BadItem,
    crop_or_pad,
    decode_audio,
    decode_image,
    read_audio,
    resample,
)
from modalign.data.inspect import inspect_source
from modalign.data.manifest import read_manifest

from helpers.data import png_bytes, small_config, small_specs, wav_bytes

MODS = ["image", "audio", "text"]


def rows(tmp_path: Path, records: list[dict]) -> list:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_manifest(path, MODS).rows


def error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        read_manifest(path, MODS)
    assert isinstance(info.value, UserInputError)
    return str(info.value)


# -- 3: CSV quotes -------------------------------------------------------------------------
def test_csv_unterminated_quote_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text('id,text\na,fine\nb,"never closed\nc,swallowed\nd,also swallowed\n')
    msg = error(path)
    assert f"{path}:3" in msg and "quote" in msg
    path.write_text('id,text\na,"a ""quoted"" word, and a\nnewline"\nb,next\n')  # legal CSV
    got = read_manifest(path, MODS).rows
    assert [r.values["text"] for r in got] == ['a "quoted" word, and a\nnewline', "next"]
    assert [r.line for r in got] == [3, 4]


# -- 6: one rule per column ----------------------------------------------------------------
def test_id_rule(tmp_path: Path) -> None:
    got = rows(tmp_path, [{"id": None, "text": "a"}, {"id": 7, "text": "b"}, {"text": "c"}])
    assert [r.id for r in got] == [f"{tmp_path.name}:1", "7", f"{tmp_path.name}:3"]
    for bad in (1.5, True, ["x"], {"a": 1}):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"id": bad, "text": "x"}) + "\n")
        msg = error(path)
        assert f"{path}:1" in msg and "id" in msg


def test_label_rule_same_in_jsonl_csv_and_parquet(tmp_path: Path) -> None:
    got = rows(
        tmp_path,
        [
            {"text": "a", "label": 1},
            {"text": "b", "label": 1.0},
            {"text": "c", "label": ""},
            {"text": "d", "label": "  "},
            {"text": "e", "label": None},
            {"text": "f", "label": "cat"},
        ],
    )
    assert [r.label for r in got] == ["1", "1", None, None, None, "cat"]
    (tmp_path / "m.csv").write_text("text,label\na,1\nb,\nc, \n")
    assert [r.label for r in read_manifest(tmp_path / "m.csv", MODS).rows] == ["1", None, None]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "label": [1.0, None]}), tmp_path / "m.parquet")
    assert [r.label for r in read_manifest(tmp_path / "m.parquet", MODS).rows] == ["1", None]
    for bad in (True, 0.5, [1], {"k": 1}):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y", "label": bad}))
        msg = error(path)
        assert f"{path}:2" in msg and "label" in msg


def test_text_and_media_cells_must_have_their_type(tmp_path: Path) -> None:
    for bad, column in (
        (["two", "captions"], "text"),
        ({"a": 1}, "text"),
        (True, "text"),
        (5, "image"),
    ):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"id": "a", "text": "ok"}) + "\n" + json.dumps({column: bad}))
        msg = error(path)
        assert f"{path}:2" in msg and repr(column) in msg
    got = rows(tmp_path, [{"id": "a", "text": "", "image": ""}, {"id": "b", "text": "t"}])
    assert [r.id for r in got] == ["b"]  # empty cells are absent, the row has nothing else
    assert rows(tmp_path, [{"text": 3}])[0].values["text"] == "3"  # a number is its text


def test_shard_json_follows_the_same_rules_as_counted_bad_items(tmp_path: Path) -> None:
    from modalign.data.shards import ShardDataset

    from helpers.data import write_shard

    metas = [
        {"id": 7, "label": 1.0, "text": "fine"},
        {"id": 1.5, "label": True, "text": ["two", "captions"]},
    ]
    samples = [
        {"__key__": f"k{i}", "png": png_bytes(), "json": json.dumps(m)} for i, m in enumerate(metas)
    ]
    url = write_shard(tmp_path / "s-000000.tar", samples)
    good, bad = list(ShardDataset(str(url), small_specs(), shuffle=False))  # file order
    assert (good.id, good.label, good.values["text"], good.bad) == ("7", "1", "fine", [])
    assert (bad.id, bad.label) == ("k1", None)  # the key, unlabeled: never "1.5" / "True"
    assert sorted(r.reason for r in bad.bad) == ["bad_id", "bad_label", "text_not_string"]
    assert "text" not in bad.values and "image" in bad.values


def test_parquet_bytes_cells_decode_as_media(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = png_bytes(200)
    struct = [{"bytes": png, "path": "ignored.png"}, {"bytes": None, "path": "rel.png"}]
    (tmp_path / "rel.png").write_bytes(png_bytes(50))
    table = pa.table({"id": ["a", "b"], "image": [png, png], "hf": struct, "text": ["x", "y"]})
    pq.write_table(table, tmp_path / "m.parquet")
    got = read_manifest(tmp_path / "m.parquet", ["image", "text"]).rows
    assert got[0].values["image"] == png  # bytes, not the string "b'\\x89PNG..."
    img = decode_image(got[0].values["image"], ImageConfig(channels=1))
    assert np.asarray(img).mean() == 200
    hf = read_manifest(tmp_path / "m.parquet", ["hf"], inline=()).rows
    assert hf[0].values["hf"] == png and hf[1].values["hf"] == str(tmp_path / "rel.png")
    ds = PairedDataset(got, small_specs(), source="m.parquet")
    assert ds[0].bad == [] and tuple(ds[0].values["image"].shape) == (1, 16, 16)


# -- 11: symlink loops ---------------------------------------------------------------------
def test_symlink_loop_is_a_counted_bad_item(tmp_path: Path) -> None:
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    (tmp_path / "ok.png").write_bytes(png_bytes())
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"id": "loop", "image": "a.png"})
        + "\n"
        + json.dumps({"id": "ok", "image": "ok.png"})
    )
    manifest = read_manifest(path, MODS)  # used to abort: resolve() raised on the loop
    with pytest.raises(BadItem) as info:
        decode_image(manifest.rows[0].values["image"], ImageConfig())
    assert info.value.reason == "symlink_loop"
    report = inspect_source(path, small_config())
    assert report["items"] == 2 and report["ok"] == 1 and report["bad"] == 1
    assert report["bad_by_reason"] == {"symlink_loop": 1}


# -- 4 and 15: images ----------------------------------------------------------------------
def test_16_bit_images_are_scaled_not_clipped() -> None:
    from PIL import Image

    gradient = (np.arange(256 * 4, dtype=np.uint32).reshape(4, 256) * 256).astype(np.uint16)
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(gradient).save(buf, format=fmt)
        out = np.asarray(decode_image(buf.getvalue(), ImageConfig(channels=1)))
        want = np.rint(gradient / 257.0)
        assert np.abs(out.astype(int) - want).max() <= 1, fmt
        assert (out == 255).mean() < 0.01  # clipping made 99.6% of it 255
        rgb = np.asarray(decode_image(buf.getvalue(), ImageConfig(channels=3)))
        assert rgb.shape == (4, 256, 3) and np.array_equal(rgb[..., 0], out)
    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(1, 256)).save(buf, "TIFF")
    out = np.asarray(decode_image(buf.getvalue(), ImageConfig(channels=1)))
    assert out.min() == 0 and out.max() == 255 and np.all(np.diff(out.astype(int)) >= 0)


def test_exif_orientation_is_applied() -> None:
    from PIL import Image

    pixels = np.zeros((10, 20), dtype=np.uint8)
    pixels[:, :10] = 255  # left half white, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", exif=exif, quality=95)
    out = np.asarray(decode_image(buf.getvalue(), ImageConfig(channels=1)))
    assert out.shape == (20, 10)  # upright: portrait
    assert out[:10].mean() > 200 and out[10:].mean() < 50  # white half on top after the turn


# -- 15: windowed audio --------------------------------------------------------------------
def _long_wave(sr: int, seconds: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t * (1 + t / 60))


def _whole_file(data: bytes, cfg: AudioConfig, rng: np.random.Generator | None) -> np.ndarray:
    wave, sr = read_audio(data)
    if sr != cfg.sample_rate:
        wave = resample(wave, sr, cfg.sample_rate)
    return crop_or_pad(wave, cfg.clip_samples, rng)


def _rng(seed: int | None) -> np.random.Generator | None:
    return None if seed is None else np.random.default_rng(seed)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_long_audio_decodes_only_the_window(fmt: str, tmp_path: Path, monkeypatch) -> None:
    import soundfile as sf

    from modalign.data import decode

    path = tmp_path / f"long.{fmt.lower()}"
    sf.write(path, np.stack([_long_wave(48000, 30)] * 2, axis=1), 48000, format=fmt)
    read: list[int] = []
    real = decode._read_frames
    monkeypatch.setattr(decode, "_read_frames", lambda f, s, n: read.append(n) or real(f, s, n))
    same_rate = AudioConfig(sample_rate=48000, clip_seconds=1.0)
    for seed in (0, 1, None):
        got = decode_audio(str(path), same_rate, _rng(seed))
        assert np.array_equal(got, _whole_file(path.read_bytes(), same_rate, _rng(seed)))
    assert read == [48000] * 3  # one clip's frames each time, never the whole file
    read.clear()
    cfg = AudioConfig(sample_rate=16000, clip_seconds=1.0)
    for seed in (0, 3, None):
        got = decode_audio(path.read_bytes(), cfg, _rng(seed))
        want = _whole_file(path.read_bytes(), cfg, _rng(seed))
        assert got.shape == want.shape == (16000,)
        assert np.abs(got - want).max() < 1e-3
    assert len(read) == 3 and max(read) < 48000 * 1.2


def test_short_and_broken_audio_keep_their_reasons() -> None:
    cfg = AudioConfig(sample_rate=8000, clip_seconds=1.0)
    short = decode_audio(wav_bytes(), cfg, np.random.default_rng(0))  # 0.5 s: padded as before
    assert short.shape == (8000,)
    silent = wav_bytes(np.zeros(8000 * 3))
    with pytest.raises(BadItem) as info:
        decode_audio(silent, cfg, np.random.default_rng(0))
    assert info.value.reason == "silent_audio"
    with pytest.raises(BadItem) as info:
        decode_audio(b"RIFF....WAVEjunk", cfg, None)
    assert info.value.reason == "unreadable_audio"


def test_bad_parquet_byte_cell_is_named_by_size_not_by_its_bytes(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a"], "image": [b"not an image"], "text": ["x"]})
    pq.write_table(table, tmp_path / "m.parquet")
    rows = read_manifest(tmp_path / "m.parquet", ["image", "text"]).rows
    (bad,) = PairedDataset(rows, small_specs(), source="m.parquet")[0].bad
    assert bad.reason == "corrupt_image" and bad.detail.startswith("<12-byte cell>: ")
    assert "not an image" not in bad.detail  # the media bytes stay out of reports


def test_data_pack_takes_parquet_bytes_cells(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modalign.data.pack import pack_shards
    from modalign.data.shards import ShardDataset

    pq.write_table(
        pa.table(
            {
                "id": ["a", "b"],
                "image": [png_bytes(90), b"not an image"],
                "audio": [wav_bytes(), None],
            }
        ),
        tmp_path / "m.parquet",
    )
    report = pack_shards(tmp_path / "m.parquet", tmp_path / "shards", cfg=small_config())
    assert report["written"] == 1 and report["bad_by_reason"] == {"corrupt_image": 1}
    assert "byte cell" in report["examples"][0]
    ds = ShardDataset(report["pattern"], small_specs())
    (sample,) = list(ds)
    assert sample.id == "a" and set(sample.values) == {"image", "audio"}
