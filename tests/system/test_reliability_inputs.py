"""Issue 10 (7, 10, 18): every path checked up front naming its key, duplicate ids named with
their lines, built-in configs without input paths, ``pipe:`` refused in configs a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from modalign.config import load_config
from modalign.core.errors import ConfigError, DataError, UserInputError
from modalign.data.inspect import inspect_source
from modalign.data.preflight import check_source, refuse_pipe
from modalign.finetune import check_finetune_inputs
from modalign.pretrain import check_pretrain_inputs

from helpers.corpus import tiny_overrides, write_tiny_corpus
from helpers.data import small_config

MODS = ["image", "audio", "text"]


def _manifest(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": f"t {i}"}) + "\n" for i in ids))
    return path


def test_built_in_configs_name_no_input_paths() -> None:
    for name in ("demo", "avmnist"):
        cfg = load_config(name)
        assert (cfg.data.train, cfg.data.val) == ("", "")
        assert (cfg.finetune.model, cfg.finetune.train, cfg.finetune.test) == ("", "", "")
    cfg = load_config("demo", ["data.train=mine.jsonl"])
    assert cfg.data.val == ""  # no built-in val the user did not make, to die on after training


def test_each_source_checked_up_front_naming_the_key(tmp_path: Path) -> None:
    good = write_tiny_corpus(tmp_path / "c", n=4)
    base = tiny_overrides(good, tmp_path / "out")
    assert set(check_pretrain_inputs(load_config("demo", base))) == {"data.train"}
    for override, key, what in (
        (f"data.val={tmp_path / 'nope.jsonl'}", "data.val", "not found"),
        (f"data.train={tmp_path / 'gone' / 'x-{{000..003}}.tar'}", "data.train", "not found"),
        (f"data.val={tmp_path}", "data.val", "no shards"),
        (f"data.val={tmp_path / 'typo'}", "data.val", "not found"),
    ):
        with pytest.raises(DataError) as info:
            check_pretrain_inputs(load_config("demo", [*base, override]))
        assert str(info.value).startswith(f"{key}: ") and what in str(info.value), override
        assert isinstance(info.value, UserInputError)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=rf"^data.val: {broken}:2: malformed JSON"):
        check_pretrain_inputs(load_config("demo", [*base, f"data.val={broken}"]))
    with pytest.raises(DataError, match="data.train: .*mix.jsonl"):
        check_source({str(good): 1.0, str(tmp_path / "mix.jsonl"): 1.0}, MODS, "data.train")
    assert not (tmp_path / "out").exists()


def test_finetune_inputs_checked_up_front(tmp_path: Path) -> None:
    good = write_tiny_corpus(tmp_path / "c", n=4)
    with pytest.raises(ConfigError, match="finetune.model is empty"):
        check_finetune_inputs(load_config("demo", [f"finetune.train={good}"]).finetune)
    sets = [f"finetune.model={tmp_path}", f"finetune.train={good}"]
    with pytest.raises(DataError, match="^finetune.test: .*missing.jsonl"):
        check_finetune_inputs(
            load_config("demo", [*sets, f"finetune.test={tmp_path / 'missing.jsonl'}"]).finetune
        )
    assert set(check_finetune_inputs(load_config("demo", sets).finetune)) == {"finetune.train"}


def test_layer_entries_check_their_inputs_themselves(tmp_path: Path) -> None:
    """The one up-front check runs inside the layer entries, so a direct library call
    (``pretrain``, ``run_finetune``) is refused before any work as the CLI is."""
    from modalign.finetune import run_finetune
    from modalign.pretrain import pretrain

    good = write_tiny_corpus(tmp_path / "c", n=4)
    missing = tmp_path / "missing.jsonl"
    cfg = load_config("demo", [*tiny_overrides(good, tmp_path / "out"), f"data.val={missing}"])
    with pytest.raises(DataError, match=f"^data.val: {missing}"):
        pretrain(cfg)  # no evaluate callback: data.val would otherwise never be read
    assert not (tmp_path / "out").exists()
    sets = [f"finetune.model={tmp_path}", f"finetune.train={good}", f"finetune.test={missing}"]
    with pytest.raises(DataError, match=f"^finetune.test: {missing}"):
        run_finetune(load_config("demo", sets).finetune, tmp_path / "clf")
    assert not (tmp_path / "clf").exists()


def test_duplicate_ids_named_with_their_lines(tmp_path: Path) -> None:
    path = _manifest(tmp_path / "m.jsonl", ["a", "b", "a", "c", "b", "a"])
    found = check_source(path, MODS, "data.train")  # training does not need unique ids
    assert found.duplicates == {"a": [1, 3, 6], "b": [2, 5]} and found.rows == 6
    with pytest.raises(DataError) as info:
        check_source(path, MODS, "index build SRC", unique_ids=True)
    msg = str(info.value)
    assert "2 id(s)" in msg and "'a' (lines 1, 3, 6)" in msg and "'b' (lines 2, 5)" in msg
    report = inspect_source(path, small_config())
    assert report["duplicate_ids"] == {
        "count": 2,
        "examples": [{"id": "a", "lines": [1, 3, 6]}, {"id": "b", "lines": [2, 5]}],
    }
    assert inspect_source(_manifest(tmp_path / "u.jsonl", ["x", "y"]), small_config())[
        "duplicate_ids"
    ] == {"count": 0, "examples": []}


def test_pipe_sources_refused_in_configs_a_run_wrote(tmp_path: Path) -> None:
    tree = {"data": {"train": {"pipe:curl -s http://x | tar -c": 1.0}, "val": ""}}
    with pytest.raises(ConfigError, match=r"data.train.*pipe:"):
        refuse_pipe(tree, "bundle")
    refuse_pipe({"data": {"train": "a.jsonl", "val": ["b.tar"]}}, "bundle")  # no pipe: fine
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.yaml").write_text(yaml.safe_dump({"data": {"train": "pipe:cat x.tar"}}))
    user = tmp_path / "mine.yaml"
    user.write_text((bundle / "config.yaml").read_text())
    assert load_config(str(user)).data.train == "pipe:cat x.tar"  # the user's own file: kept
    assert load_config(str(bundle / "config.yaml")).data.train == "pipe:cat x.tar"
    for marker in ("modalign.json", "state.json"):  # a bundle's / a checkpoint's config
        (bundle / marker).write_text("{}")
        with pytest.raises(ConfigError, match="written by a run"):
            load_config(str(bundle / "config.yaml"))
        # the user may still type it
        cfg = load_config(str(bundle / "config.yaml").replace("config.yaml", "../mine.yaml"))
        assert cfg.data.train == "pipe:cat x.tar"
        (bundle / marker).unlink()


@pytest.mark.parametrize("bad_id", ["a\nb", "tab\there", "nul\x00", "line\u2028sep", "\ud800"])
def test_an_id_with_a_control_character_is_refused_where_the_row_is_read(
    tmp_path: Path, bad_id: str, capsys: pytest.CaptureFixture
) -> None:
    """Issue 21 item 16: ``data inspect`` names the file and line, instead of ``index build``
    failing after embedding everything (ids are stored one per line)."""
    from modalign.cli import main

    manifest = _manifest(tmp_path / "m.jsonl", ["ok0", "ok1", bad_id])
    with pytest.raises(DataError, match=r"m.jsonl:3: id .* contains the character U\+"):
        inspect_source(manifest)
    assert main(["-q", "data", "inspect", str(manifest)]) == 2
    assert f"{manifest}:3: id" in capsys.readouterr().err
    csv = tmp_path / "m.csv"
    csv.write_text('id,text\nok,t\n"two\nlines",t\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"m.csv:\d+: id 'two\\nlines'"):
        inspect_source(csv)


def test_a_shard_id_with_a_newline_is_a_counted_bad_record(tmp_path: Path) -> None:
    from modalign.data.sources import open_source

    from helpers.data import write_shard

    shard = write_shard(
        tmp_path / "s-000000.tar",
        [
            {"__key__": "k0", "txt": "fine", "json": json.dumps({"id": "good"}).encode()},
            {"__key__": "k1", "txt": "fine", "json": json.dumps({"id": "a\nb"}).encode()},
        ],
    )
    samples = list(open_source(str(shard), {}))
    assert [s.id for s in samples] == ["good", "k1"]  # the key stands in for the bad id
    assert sum(b.reason == "bad_id" for s in samples for b in s.bad) == 1


def _cut_wav(path: Path) -> Path:
    """A WAV whose header declares 11,756 data bytes, of which 16 are present."""
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    wave = (0.5 * np.sin(np.arange(5878) / 10)).astype(np.float32)
    sf.write(buf, wave, 8000, format="WAV", subtype="PCM_16")
    path.write_bytes(buf.getvalue()[: 44 + 16])
    return path


def test_a_truncated_wav_is_corrupt_in_a_manifest(tmp_path: Path) -> None:
    """Issue 21 item 17: libsndfile decodes the 16 bytes left; the header says otherwise."""
    from modalign.data.decode import BadItem, read_audio

    cut = _cut_wav(tmp_path / "cut.wav")
    with pytest.raises(BadItem, match="declares 11756 bytes in chunk 'data', 16 are present"):
        read_audio(cut)
    corpus = write_tiny_corpus(tmp_path / "c", n=4)
    rows = [json.loads(x) for x in corpus.read_text().splitlines()]
    rows[1]["audio"] = str(cut)
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = inspect_source(corpus)
    assert report["bad_by_reason"].get("truncated_audio") == 1, report


def test_a_truncated_wav_query_is_refused(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from modalign.cli import main

    from helpers.serve import tiny_index_once

    tiny = tiny_index_once(tmp_path_factory.getbasetemp())
    cut = _cut_wav(tmp_path / "cut.wav")
    assert main(["-q", "search", "--index", str(tiny.index), "--audio", str(cut)]) == 2
    assert "truncated_audio" in capsys.readouterr().err
