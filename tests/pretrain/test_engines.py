"""Issue 14 item 4, in one process: the user's Accelerate config is honoured unless the YAML
sets the key; checkpoints are what ``accelerator.save_state`` writes inside the one atomic
directory (format 2, sha256 of every file in ``state.json``); format 1 checkpoints still resume
exactly; the pickles of sharded (DCP) checkpoints are checked before torch reads them.

The launched engines (FSDP and DDP on 2 CPU processes) are in ``test_fsdp.py`` and
``test_engines_ddp.py``.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from modalign.config import load_config
from modalign.core.errors import ConfigError, UserInputError
from modalign.pretrain import checkpoint as ckpt
from modalign.pretrain.accelerate_setup import check_precision, make_accelerator, uses_cpu
from modalign.pretrain.checkpoint.safe_pickle import check_dcp_pickles
from modalign.pretrain.process_state import process_state_guard
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides


def _sets(manifest: Path, out: Path, steps: int) -> list[str]:
    return [
        *tiny_overrides(manifest, out, steps=steps, batch=8),
        "model.modalities=[image,audio]",
        "model.towers.image.drop_rate=0.3",  # a resume that lost the RNG state would show
        "optim.warmup_steps=1",
        "optim.decay_steps=4",
        "train.threads=1",
        "train.keep_checkpoints=0",
    ]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("straight")
    pretrain(load_config(None, _sets(corpus, out, steps=2)))
    return out


def _resume_from_step_1(straight: Path, out: Path) -> Path:
    step = out / "checkpoints" / "step-1"
    shutil.copytree(straight / "checkpoints" / "step-1", step)
    return step


# ---- the user's Accelerate config ---------------------------------------------------------


def test_accelerate_mixed_precision_is_used_unless_the_yaml_sets_precision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` exports
    out = [f"output.dir={tmp_path}", "train.device=cpu"]
    with process_state_guard():
        assert make_accelerator(load_config(None, out)).mixed_precision == "bf16"
    with process_state_guard():
        fixed = load_config(None, [*out, "train.precision=fp32"])
        assert make_accelerator(fixed).mixed_precision == "no"


def test_use_cpu_from_the_accelerate_config_wins_over_a_visible_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    cfg = load_config(None, [])
    assert not uses_cpu(cfg)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # `use_cpu: true` in the Accelerate config
    assert uses_cpu(cfg)
    assert not uses_cpu(load_config(None, ["train.device=cuda"]))  # the YAML's device wins


def test_deepspeed_config_without_deepspeed_is_refused_up_front(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:  # deliberately not a dependency
        pytest.skip("deepspeed is installed here")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        check_precision(load_config(None, []))


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("train.accum_steps=2", "train.accum_steps"),
        ("train.val_every=1", "train.val_every"),
        ("train.frozen_towers=loader", "train.frozen_towers"),
    ],
)
def test_sharded_engine_refuses_what_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, setting: str, key: str
) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=rf"{key}=.* with FSDP"):
        check_precision(load_config(None, [setting]))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_precision(load_config(None, [setting]))  # fine without a sharded engine


# ---- format 2: save_state inside the atomic directory -----------------------------------


def test_checkpoint_is_save_state_with_a_manifest_of_every_file(straight: Path) -> None:
    step = straight / "checkpoints" / "step-2"
    meta = json.loads((step / "state.json").read_text())
    assert (meta["format"], meta["format_version"]) == ("modalign.checkpoint", 2)
    assert (meta["engine"], meta["sharded"], meta["world_size"]) == ("NO", False, 1)
    on_disk = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()}
    assert set(meta["files"]) == on_disk - {"state.json"}
    # Accelerate's own files, plus modalign's model file and schedule
    assert {
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "scheduler.json",
    } <= on_disk
    assert not any(name.endswith(".pt") for name in on_disk)  # format 1 files are gone
    keys = set(_weights(step))
    assert (
        any(k.startswith("encoder.trunks.image.") for k in keys)
        and "loss.log_scale.audio__image" in keys
    )


def test_resume_from_format_2_equals_uninterrupted(
    corpus: Path, straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "resumed"
    _resume_from_step_1(straight, out)
    pretrain(load_config(None, _sets(corpus, out, steps=2)), resume="latest")
    want, got = _weights(straight), _weights(out)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_an_edited_checkpoint_file_is_refused_before_training(
    corpus: Path, straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "edited"
    step = _resume_from_step_1(straight, out)
    blob = bytearray((step / "optimizer.bin").read_bytes())
    blob[-20] ^= 0xFF
    (step / "optimizer.bin").write_bytes(bytes(blob))
    with pytest.raises(UserInputError, match=r"optimizer\.bin: checksum does not match"):
        pretrain(load_config(None, _sets(corpus, out, steps=2)), resume="latest")


def test_a_newer_checkpoint_format_is_refused_naming_the_versions(
    corpus: Path, straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "future"
    step = _resume_from_step_1(straight, out)
    meta = json.loads((step / "state.json").read_text())
    (step / "state.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(UserInputError, match=r"format version 3 .*\(1\.\.2\)"):
        pretrain(load_config(None, _sets(corpus, out, steps=2)), resume="latest")


# ---- format 1 still resumes --------------------------------------------------------------


def _as_format_1(step: Path) -> None:
    """Rewrite a format-2 checkpoint into the files format 1 had (0-d temperatures too)."""
    from accelerate.utils import load as accelerate_load  # weights_only, numpy allowed
    from safetensors.torch import load_file, save_file

    weights = load_file(str(step / "model.safetensors"))
    save_file({k: v.reshape(()) if k.startswith("loss.") else v for k, v in weights.items()},
              str(step / "model.safetensors"))  # fmt: skip
    optimizer = ckpt.torch_load(step / "optimizer.bin")
    for state in optimizer["state"].values():  # the temperatures' Adam moments were 0-d too
        state.update({k: v.reshape(()) for k, v in state.items() if v.shape == (1,)})
    torch.save(optimizer, step / "optimizer.pt")
    torch.save(json.loads((step / "scheduler.json").read_text()), step / "scheduler.pt")
    rng = accelerate_load(step / "random_states_0.pkl")
    version, state, gauss = rng["random_state"]
    name, keys, *rest = rng["numpy_random_seed"]
    torch.save(
        {
            "python": [version, list(state), gauss],
            "numpy": [name, torch.from_numpy(keys.astype("int64")), *rest],
            "torch": rng["torch_manual_seed"],
        },
        step / "rng-0.pt",
    )
    for name in ("optimizer.bin", "scheduler.json", "random_states_0.pkl"):
        (step / name).unlink()
    meta = json.loads((step / "state.json").read_text())
    old = {k: meta[k] for k in ("step", "micro_batches", "world_size", "config")}
    (step / "state.json").write_text(json.dumps(old))


def test_format_1_checkpoint_resumes_exactly(corpus: Path, straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "v1"
    step = _resume_from_step_1(straight, out)
    _as_format_1(step)
    assert ckpt.read_state(step)["format_version"] == 1
    pretrain(load_config(None, _sets(corpus, out, steps=2)), resume="latest")
    want, got = _weights(straight), _weights(out)
    assert all(torch.equal(want[k], got[k]) for k in want)


# ---- pickles of sharded (DCP) checkpoints ------------------------------------------------


class _Smuggled:
    def __reduce__(self):  # what a hostile pickle does: call a global on load
        return (print, ("this must never run",))


def _dcp(folder: Path, state: dict) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    return folder


def test_dcp_pickles_of_a_real_checkpoint_pass(tmp_path: Path) -> None:
    state = {
        "w": torch.arange(6.0).reshape(2, 3),
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.98)}],
    }
    assert check_dcp_pickles(_dcp(tmp_path / "ok", state)) == 1


def test_dcp_metadata_naming_another_global_is_refused(tmp_path: Path) -> None:
    folder = _dcp(tmp_path / "meta", {"w": torch.ones(2)})
    (folder / ".metadata").write_bytes(pickle.dumps(_Smuggled()))
    with pytest.raises(UserInputError, match=r"\.metadata: refused .*builtins\.print"):
        check_dcp_pickles(tmp_path)


def test_dcp_entry_that_would_unpickle_code_is_refused(tmp_path: Path) -> None:
    folder = _dcp(tmp_path / "entry", {"w": torch.ones(2), "extra": _Smuggled()})
    with pytest.raises(UserInputError, match=r"entry extra"):
        check_dcp_pickles(folder)
