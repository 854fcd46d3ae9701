"""Resuming is exact: a run killed with SIGKILL and resumed ends with the weights of the
uninterrupted run; extending ``train.steps`` by resuming equals running longer straight (the
LR horizon is ``optim.decay_steps``); checkpoints are atomic.

Dropout and SpecAugment are on, so a resume that lost the RNG state would show.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modalign.config import load_config
from modalign.core.artifact import atomic_dir
from modalign.pretrain import checkpoint as ckpt
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides, write_tiny_corpus

SCRIPTS = Path(__file__).resolve().parents[1] / "dist_scripts"


def _overrides(manifest: Path, out: Path, steps: int) -> list[str]:
    return [
        *tiny_overrides(manifest, out, steps=steps, batch=8),
        "model.modalities=[image,audio]",
        "model.towers.image.drop_rate=0.3",
        "model.towers.audio.drop_rate=0.3",
        "data.audio.spec_augment=true",
        "data.audio.freq_mask=4",
        "data.audio.time_mask=4",
        "optim.warmup_steps=2",
        "optim.decay_steps=6",
        "train.threads=1",
        "train.keep_checkpoints=3",
    ]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0, msg=key)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("resume"), n=24)


@pytest.fixture(scope="module")
def straight(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """4 steps, uninterrupted (3 epochs of 24 items at batch 8: crosses an epoch boundary)."""
    out = tmp_path_factory.mktemp("straight")
    pretrain(load_config(None, _overrides(corpus, out, steps=4)))
    return _weights(out)


@pytest.mark.slow
@pytest.mark.distributed  # a training subprocess killed after a checkpoint
def test_sigkill_after_step_2_then_resume_equals_uninterrupted(
    corpus: Path, straight: dict, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    spec = tmp_path / "overrides.json"
    spec.write_text(json.dumps(_overrides(corpus, out, steps=4)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "kill_after_checkpoint.py"), "2", str(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]
    assert not (out / "model.safetensors").exists()  # killed before the bundle

    pretrain(load_config(None, _overrides(corpus, out, steps=4)), resume="latest")
    _assert_same(_weights(out), straight)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 4]


def test_extending_steps_by_resume_equals_longer_run(
    corpus: Path, straight: dict, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    pretrain(load_config(None, _overrides(corpus, out, steps=2)))
    short = _weights(out)
    pretrain(load_config(None, _overrides(corpus, out, steps=4)), resume="latest")
    _assert_same(_weights(out), straight)
    assert any(not torch.equal(short[k], straight[k]) for k in short)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(
    corpus: Path, straight: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if "step-3" in str(f):
            raise OSError("No space left on device (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        pretrain(load_config(None, _overrides(corpus, out, steps=4)))
    monkeypatch.undo()

    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("step-")]
    assert leftovers == [], "a failed write must not leave temp dirs behind"
    assert ckpt.resolve_resume(out, "latest") == out / "checkpoints" / "step-2"
    pretrain(load_config(None, _overrides(corpus, out, steps=4)), resume="latest")
    _assert_same(_weights(out), straight)


def test_atomic_dir_replacing_an_existing_dir_fails_cleanly(tmp_path: Path) -> None:
    final = tmp_path / "step-5"
    with atomic_dir(final) as tmp:
        (tmp / "state.json").write_text('{"step": 5}')
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "state.json").write_text("{half")
        raise RuntimeError("crash mid-write")
    assert (final / "state.json").read_text() == '{"step": 5}'
    assert [p.name for p in tmp_path.iterdir()] == ["step-5"]


def test_stale_temp_dirs_are_removed_and_never_listed(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / ".tmp-step-3-abc").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-3-abc" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-2").mkdir()  # no state file: incomplete
    assert ckpt.list_checkpoints(tmp_path) == []
    assert ckpt.resolve_resume(tmp_path, "latest") is None
    removed = ckpt.remove_stale_temp_dirs(tmp_path)
    assert [p.name for p in removed] == [".tmp-step-3-abc"]


def test_resume_with_a_changed_config_refuses_what_cannot_be_resumed(
    corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from modalign.core.errors import UserInputError

    out = tmp_path / "run"
    pretrain(load_config(None, _overrides(corpus, out, steps=1)))
    for change, key in (
        ("model.embed_dim=32", "model.embed_dim"),
        ("model.modalities=[audio,image]", "model.modalities"),
        ("model.towers.audio.arch=resnet18", "model.towers.audio.arch"),
    ):
        cfg = load_config(None, [*_overrides(corpus, out, steps=2), change])
        with pytest.raises(UserInputError, match=rf"{key}: .* -> "):
            pretrain(cfg, resume="latest")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]  # nothing trained by the refusals

    caplog.set_level("WARNING", logger="modalign.pretrain.checkpoint.state")
    cfg = load_config(None, [*_overrides(corpus, out, steps=2), "optim.lr=0.001"])
    result = pretrain(cfg, resume="latest")
    assert result.steps == 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "optim.lr changed: 0.0005 -> 0.001" in warned and "train.steps changed" in warned


@pytest.mark.slow
def test_resume_from_every_checkpoint_equals_uninterrupted(
    corpus: Path, straight: dict, tmp_path: Path
) -> None:
    import shutil

    full = tmp_path / "full"
    pretrain(load_config(None, [*_overrides(corpus, full, steps=4), "train.keep_checkpoints=0"]))
    assert [s for s, _ in ckpt.list_checkpoints(full)] == [1, 2, 3, 4]
    for step in (1, 2, 3):
        out = tmp_path / f"from-{step}"
        shutil.copytree(full / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")
        pretrain(load_config(None, _overrides(corpus, out, steps=4)), resume="latest")
        _assert_same(_weights(out), straight)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny corpus with captions of many lengths: batched, they pad differently."""
    root = tmp_path_factory.mktemp("captioned")
    manifest = write_tiny_corpus(root, n=24)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["text"] = " ".join(["a spoken digit"] * (1 + i % 6) + [row["text"]])
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.mark.slow
def test_finish_then_extend_equals_straight_with_a_frozen_text_tower(
    captioned: Path, tmp_path: Path
) -> None:
    """Issue 21 item 3: finish at N, extend to M by --resume == straight to M, bit for bit.

    The frozen text tower caches each caption's embedding; the straight run fills the cache in
    epoch 1, the extended run refills it after the resume. A caption embedded among others
    (padded to their length) differs in its last bits from one embedded alone, so the cache
    must not depend on the company a caption first came in.
    """

    def cfg(out: Path, steps: int):
        return load_config(
            None,
            [
                *_overrides(captioned, out, steps=steps),
                "model.modalities=[image,audio,text]",
                "train.frozen_towers=step",  # the text cache lives in this process, all epochs
            ],
        )

    straight = tmp_path / "straight"
    pretrain(cfg(straight, 8))  # 3 epochs: captions repeat after step 3
    extended = tmp_path / "extended"
    pretrain(cfg(extended, 4))  # finished normally at 4 ...
    pretrain(cfg(extended, 8), resume="latest")  # ... then extended to 8
    got, want = _weights(extended), _weights(straight)
    assert set(got) == set(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]  # bit for bit
    assert not differ, f"{len(differ)} of {len(want)} tensors differ, e.g. {differ[:3]}"


def test_a_frozen_string_cache_does_not_depend_on_the_first_batch() -> None:
    """The cached output of a string is what embedding it alone gives, whatever batch it first
    came in (an empty cache after a resume then refills with the same values)."""
    from modalign.pretrain.towers.strings import StringTrunk

    class PaddedTrunk(StringTrunk):
        def embed(self, texts):  # like a padded transformer: output depends on the batch
            longest = max(len(t) for t in texts)
            return torch.tensor([[len(t) + 1e-3 * longest] for t in texts])

    warm, cold = PaddedTrunk(), PaddedTrunk()
    warm(["a", "a much longer caption"])
    assert torch.equal(warm(["a"]), cold(["a"]))
