"""Issue 10 (18): artifacts honour the umask as ordinary files do (not 0600/0700 regardless),
for every writer of the one protocol (atomic_dir, atomic_files, atomic_path, atomic_write_*)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from modalign.core.artifact import atomic_dir, atomic_files, atomic_path, atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_every_writer_honours_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "state.json").write_text("{}")
            (tmp / "sub").mkdir()
        with atomic_files(tmp_path / "bundle", "meta.json") as (tmp, meta):
            (tmp / "model.safetensors").write_bytes(b"x")
            meta["format"] = "test"
        with atomic_path(tmp_path / "index.faiss") as tmp:
            Path(tmp).write_bytes(b"y")
        atomic_write_text(tmp_path / "metrics.jsonl", "{}\n")
        (tmp_path / "plain.txt").write_text("ordinary file")
    finally:
        os.umask(old)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    assert _mode(tmp_path / "plain.txt") == file_mode
    for f in ("ckpt/state.json", "bundle/model.safetensors", "bundle/meta.json",
              "index.faiss", "metrics.jsonl"):  # fmt: skip
        assert _mode(tmp_path / f) == file_mode, f
    for d in ("ckpt", "ckpt/sub"):
        assert _mode(tmp_path / d) == dir_mode, d
