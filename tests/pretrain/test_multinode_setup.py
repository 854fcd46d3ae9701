"""Issue 24, the parts of :mod:`modalign.pretrain.multinode` that need no second process (the
2-machine behaviour is in ``tests/system/test_multinode.py``)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from modalign.config import load_config
from modalign.core.errors import ConfigError
from modalign.pretrain.multinode import check_shared_output, group_timeout_handler, run_failed


@pytest.mark.parametrize("seconds", [5, 600, 1800])
def test_dist_timeout_reaches_init_process_group(seconds: int) -> None:
    """Accelerate passes on only non-default handler values; 600 s is its default and would
    silently become torch's 1800 s for gloo without the nudge."""
    kwargs = group_timeout_handler(seconds).to_kwargs()
    assert kwargs.get("backend", "unset") is None  # Accelerate keeps choosing the backend
    assert timedelta(seconds=seconds) <= kwargs["timeout"] < timedelta(seconds=seconds + 1)


def test_keys_are_checked() -> None:
    cfg = load_config(None, ["train.dist_timeout=30", "train.shared_fs_wait=2.5"])
    assert (cfg.train.dist_timeout, cfg.train.shared_fs_wait) == (30, 2.5)
    with pytest.raises(ConfigError, match="train.dist_timeout"):
        load_config(None, ["train.dist_timeout=0"])
    with pytest.raises(ConfigError, match="train.shared_fs_wait"):
        load_config(None, ["train.shared_fs_wait=-1"])


def test_one_process_writes_no_marker(tmp_path: Path) -> None:
    check_shared_output(tmp_path / "run", wait_s=0)
    assert not (tmp_path / "run").exists()


def test_failure_message_names_the_checkpoint_and_the_key(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step-3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-3" / "state.json").write_text("{}")
    err = run_failed(RuntimeError("Connection closed by peer\nmore"), 1800, tmp_path)
    text = str(err)
    assert "RuntimeError: Connection closed by peer." in text and "more" not in text
    assert "train.dist_timeout=1800 s" in text and "--resume latest" in text
    assert str(tmp_path / "checkpoints" / "step-3") in text
