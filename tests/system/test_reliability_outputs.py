"""Output folders (issue 21 items 1, 2, 14): every writer claims its folder through
:func:`modalign.core.artifact.output_dir`: a folder holding the user's files is refused (exit 2,
naming it and the key) and left untouched, an empty ``output.dir`` is not the current folder,
a second writer of a folder stops at once (exit 2) before any work, and the lock outlives the
writer's final rename and dies with its process (never kept by a forked child)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from modalign.cli import main
from modalign.core.artifact import (
    LOCK_FILE,
    DirectoryLocked,
    OutputKind,
    atomic_dir,
    lock_dir,
    output_dir,
)
from modalign.core.errors import ConfigError, UserInputError

from helpers.corpus import tiny_overrides


def _sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


# Each writer's command line, given its output folder. Inputs are bogus wherever the command
# claims its folder before reading them: a refusal naming the folder then proves the claim
# comes first (a late claim would fail on the inputs instead).
WRITERS: dict[str, Callable[[Path, Path], list[str]]] = {
    "pretrain": lambda out, c: [
        "pretrain", "demo", *_sets(*tiny_overrides(c, out, steps=1), "train.threads=1")
    ],
    "index build": lambda out, c: [
        "index", "build", "--model", str(out.parent / "no-model"), "--data", str(c),
        "--out", str(out),
    ],
    "index add": lambda out, c: [
        "index", "add", "--index", str(out), "--model", str(out.parent / "no-model"),
        "--data", str(c),
    ],
    "data pack": lambda out, c: ["data", "pack", str(out.parent / "none.jsonl"), "--out", str(out)],
    "embed": lambda out, c: [
        "embed", "--model", str(out.parent / "no-model"), "--data", str(c), "--out", str(out)
    ],
    "data build-demo": lambda out, c: ["data", "build-demo", "--out", str(out)],
    "benchmark": lambda out, c: [
        "benchmark", "demo", "--model", str(out.parent / "no-model"), "--out", str(out)
    ],
    "tune": lambda out, c: ["tune", "demo", "--budget", "1", "--study", str(out)],
    "demo": lambda out, c: ["demo", "--out", str(out)],
}  # fmt: skip
KEYS = {"pretrain": "output.dir", "index add": "--index", "tune": "--study"}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_folder_of_user_files_is_refused_and_left_untouched(
    writer: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    (out / "config.yaml").write_text("mine: true\n")
    before = _snapshot(out)
    assert main(["-q", *WRITERS[writer](out, corpus)]) == 2
    err = capsys.readouterr().err
    assert f"{KEYS.get(writer, '--out')}={out}" in err, err
    assert "refusing to overwrite" in err and "notes.txt" in err
    assert _snapshot(out) == before  # not even a lock file


def _unloadable_model_cfg(tmp_path: Path, corpus: Path):
    """Inputs that pass the up-front checks (a folder, a real manifest) but whose "bundle" is an
    empty folder: loading it would fail, so an error about the output comes before any load."""
    from modalign.config import load_config

    (tmp_path / "not-a-bundle").mkdir()
    sets = [f"finetune.model={tmp_path / 'not-a-bundle'}", f"finetune.train={corpus}"]
    return load_config("demo", sets)


def test_finetune_refuses_a_folder_of_user_files(corpus: Path, tmp_path: Path) -> None:
    from modalign.finetune.pipeline import run_finetune

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    (out / "config.yaml").write_text("mine: true\n")
    before = _snapshot(out)
    cfg = _unloadable_model_cfg(tmp_path, corpus)
    with pytest.raises(UserInputError, match=rf"finetune.out={out}: .*refusing to overwrite"):
        run_finetune(cfg.finetune, out)
    assert _snapshot(out) == before


def test_an_empty_output_dir_is_not_the_current_folder(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine: true\n")
    argv = ["-q", "pretrain", "demo", *_sets(*tiny_overrides(corpus, tmp_path, steps=1))]
    assert main([*argv, "--set", "output.dir="]) == 2
    assert "output.dir=''" in capsys.readouterr().err
    assert main(["-q", "finetune", "demo", "--set", "output.dir="]) == 2
    assert (tmp_path / "config.yaml").read_text() == "mine: true\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    with (
        pytest.raises(ConfigError, match="--out=''"),
        output_dir("", OutputKind("x", "y"), "--out"),
    ):
        pass


@contextmanager
def _held_by_another(folder: Path) -> Iterator[None]:
    """What a first writer does: an exclusive flock on the folder's lock file (another open
    file description conflicts even within one process)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242", 0)
        yield
    finally:
        os.close(fd)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_second_writer_stops_at_once(
    writer: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    with _held_by_another(out):
        assert main(["-q", *WRITERS[writer](out, corpus)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: another modalign process (pid 4242)" in err, err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written


def test_a_second_finetune_stops_before_loading_the_model(corpus: Path, tmp_path: Path) -> None:
    from modalign.finetune.pipeline import run_finetune

    out = tmp_path / "clf"
    cfg = _unloadable_model_cfg(tmp_path, corpus)
    with _held_by_another(out), pytest.raises(DirectoryLocked, match="pid 4242"):
        run_finetune(cfg.finetune, out)


def test_the_lock_outlives_the_final_rename(tmp_path: Path) -> None:
    """atomic_dir swaps a new directory in; the lock file the writer holds moves with it, so a
    writer arriving between the swap and the end of the first one's run is still refused."""
    out = tmp_path / "idx"
    kind = OutputKind("modalign.test-kind", "test artifact")
    with output_dir(out, kind, "--out"):
        with atomic_dir(out) as tmp:
            (tmp / "payload").write_text("v1")
        assert (out / "payload").read_text() == "v1"
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert f"{os.getpid()} modalign.test-kind" == (out / LOCK_FILE).read_text()


def test_own_kind_is_accepted_and_a_failed_first_claim_leaves_nothing(tmp_path: Path) -> None:
    kind = OutputKind("modalign.test-kind", "test artifact", (("meta.json", "modalign.test-kind"),))
    old = tmp_path / "old"  # written before lock files recorded kinds: its metadata marks it
    old.mkdir()
    (old / "meta.json").write_text('{"format": "modalign.test-kind"}')
    (old / "payload").write_text("x")
    with output_dir(old, kind, "--out"):
        pass
    other = OutputKind("modalign.other", "other artifact")
    with pytest.raises(UserInputError, match="not a modalign other"), output_dir(old, other, "-o"):
        pass
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), output_dir(fresh, kind, "--out"):
        raise RuntimeError("input error after the claim")
    assert not fresh.exists()


_FORK_HOLDER = """
import os, sys, time
from modalign.core.artifact import lock_dir
with lock_dir(sys.argv[1]):
    child = os.fork()
    if child == 0:  # like a DataLoader worker: fork without exec, outlives the parent
        # printed from the child: its at-fork handlers have run once fork() returned here
        print(os.getpid(), flush=True)
        time.sleep(60)
        os._exit(0)
    time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_forked_child_does_not_keep_a_killed_writers_lock(tmp_path: Path) -> None:
    """The flock belongs to the open file description a fork shares: before the fix, an
    orphaned child kept a SIGKILLed writer's folder locked until it exited."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", _FORK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    child = 0
    try:
        child = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the orphan still runs
        with lock_dir(out):  # at once: the orphan does not hold it
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
        if child:
            with suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_right_after_sigkill_of_pretrain_with_loader_workers(
    corpus: Path, tmp_path: Path
) -> None:
    """Issue 21 item 14: SIGKILL a pretraining run whose DataLoader workers are alive; an
    immediate --resume must not be refused by a lock the orphaned workers kept."""
    out = tmp_path / "run"
    sets = [*tiny_overrides(corpus, out, steps=400), "train.threads=1", "data.num_workers=2"]
    argv = [sys.executable, "-m", "modalign", "-q", "pretrain", "demo", *_sets(*sets)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = 600
        while deadline and not list((out / "checkpoints").glob("step-*/state.json")):
            assert proc.poll() is None, proc.stderr.read().decode()
            deadline -= 1
            subprocess.run(["sleep", "0.5"], check=True)
        workers = _children(proc.pid)
        assert workers, "no DataLoader worker was running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert any(_alive(w) for w in workers)  # orphans still there: the case that mattered
        with lock_dir(out):  # at once, before the orphans notice their parent is gone
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:
            with suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
