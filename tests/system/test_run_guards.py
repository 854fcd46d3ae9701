"""Guards around a pretraining run: config values checked up front (exit 2 naming the key), the
output dir locked for the whole run, and a failed bundle write leaving the old bundle's
``run_config.yaml`` and ``metrics.jsonl`` untouched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modalign.cli import main
from modalign.config import load_config
from modalign.core.artifact import ArtifactWriteError, DirectoryLocked
from modalign.core.errors import ConfigError
from modalign.pretrain import trainer

from helpers.corpus import tiny_overrides


@pytest.mark.parametrize(
    "assignment",
    [
        "train.batch_size=0",
        "train.batch_size=-4",
        "train.log_every=0",
        "train.accum_steps=0",
        "train.steps=0",
        "train.steps=-1",
        "train.checkpoint_every=-1",
        "optim.lr=0",
        "optim.lr=.nan",
        "optim.betas=[0.9]",
        "optim.grad_clip=-1",
    ],
)
def test_bad_config_values_are_refused_naming_the_key(assignment: str) -> None:
    key = assignment.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}="):
        load_config(None, [assignment])
    assert main(["-q", "pretrain", "demo", "--set", assignment]) == 2


def _cfg(corpus: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            *tiny_overrides(corpus, out, steps=1, batch=8),
            "model.modalities=[image,audio]",
            "train.threads=1",
            *extra,
        ],
    )


@pytest.mark.distributed  # a lock holder in a subprocess
def test_second_run_into_a_locked_output_dir_fails_at_once(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom modalign.core.artifact import lock_dir\n"
            f"with lock_dir({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLocked, match=rf"{out}.*pid {holder.pid}"):
            trainer.pretrain(_cfg(corpus, out))
        assert not (out / "checkpoints").exists()  # nothing written by the refused run
        sets = [f"data.train={corpus}", f"output.dir={out}"]
        assert main(["-q", "pretrain", "demo", *[a for s in sets for a in ("--set", s)]]) == 2
    finally:
        holder.kill()
        holder.wait()
    trainer.pretrain(_cfg(corpus, out))  # the lock died with its holder
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow  # two training runs
def test_failed_bundle_write_keeps_the_old_bundles_log_and_config(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    trainer.pretrain(_cfg(corpus, out))
    before = {n: (out / n).read_bytes() for n in ("metrics.jsonl", "run_config.yaml")}

    def disk_full(*args, **kwargs):
        raise ArtifactWriteError(f"{out}: could not write (disk full)")

    monkeypatch.setattr(trainer, "save_bundle", disk_full)
    with pytest.raises(ArtifactWriteError):
        trainer.pretrain(_cfg(corpus, out, "optim.lr=1e-3", "train.steps=2"))
    assert {n: (out / n).read_bytes() for n in before} == before
