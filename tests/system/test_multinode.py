"""Issue 24: training over two machines, simulated on one host (CPU, gloo).

Each "machine" is its own ``torchrun --nnodes 2 --node_rank R --nproc_per_node 1`` launcher in a
session of its own, both rendezvousing at 127.0.0.1 (what two hosts do with ``--master_addr``):

* 2 machines x 1 process x 8 give the weights of 1 process x 16 (the one-machine contract);
  every rank's RNG file lands in the one checkpoint folder global rank 0 staged;
* one machine dies (its launcher and worker SIGKILLed right after checkpoint 1): the other exits
  non-zero with an error that says what to do, instead of hanging; restarting both machines with
  ``--resume latest`` ends bit-exact with the uninterrupted 2-machine run;
* one machine hangs (SIGSTOPped: nothing closed, nothing said): the other gives up after
  ``train.dist_timeout`` seconds;
* machines that do not share ``output.dir`` (same path, different folders: each launcher in its
  own working directory with a relative ``output.dir``) are refused up front, exit 2, naming the
  folder and the key.

The test asserts no timings; a hang is caught by the subprocess timeout. Run with ``-s`` to see
how long the surviving machine took to exit.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from helpers.corpus import tiny_overrides, write_tiny_corpus
from helpers.multinode import SCRIPTS, run_ok, sets, torch_threads, two_machines

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.heavy]

STEPS = 2
COMMON = ["train.threads=1", "optim.lr=0.001", "train.keep_checkpoints=0"]


def _pretrain_program(overrides: list[str], config: Path, *extra: str) -> list[str]:
    return ["-m", "modalign", "pretrain", str(config), *sets(overrides), *extra]


def _dies(mode: str, overrides: list[str], config: Path) -> list[str]:
    """Rank 1's machine goes down right after checkpoint 1."""
    return [str(SCRIPTS / "machine_dies.py"), mode, "1", "1", "--", "pretrain", str(config),
            *sets(overrides)]  # fmt: skip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("multinode")
    config = root / "run.yaml"
    config.write_text("train:\n  seed: 0\n")
    return write_tiny_corpus(root / "corpus", n=16), config


@pytest.fixture(scope="module")
def straight(corpus: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-machine run (2 x 1 process x 8, checkpoint every step)."""
    manifest, config = corpus
    root = tmp_path_factory.mktemp("straight")
    out = root / "run"
    run_ok(_pretrain_program([*tiny_overrides(manifest, out, STEPS, 8), *COMMON], config), root)
    return out


def test_two_machines_x8_equal_one_process_x16(
    corpus: tuple[Path, Path], straight: Path, tmp_path: Path
) -> None:
    from modalign.config import load_config
    from modalign.pretrain.trainer import pretrain

    manifest, _ = corpus
    pretrain(load_config(None, [*tiny_overrides(manifest, tmp_path, STEPS, 16), *COMMON]))
    one, two = _weights(tmp_path), _weights(straight)
    assert set(one) == set(two)
    assert any("running_var" in k for k in one), "BatchNorm statistics must be compared too"
    for key, w in one.items():
        torch.testing.assert_close(two[key], w, atol=1e-4, rtol=1e-4, msg=key)
    # Who wrote what: rank 0 staged each checkpoint, every rank put its RNG state into it, and
    # the shared-folder check left no marker behind.
    for step in range(1, STEPS + 1):
        names = {p.name for p in (straight / "checkpoints" / f"step-{step}").iterdir()}
        assert {"state.json", "random_states_0.pkl", "random_states_1.pkl"} <= names
    assert not [p for p in straight.iterdir() if p.name.startswith(".tmp-")]


def test_dead_machine_fails_the_other_and_both_resume_bit_exact(
    corpus: tuple[Path, Path], straight: Path, tmp_path: Path
) -> None:
    manifest, config = corpus
    out = tmp_path / "run"
    overrides = [*tiny_overrides(manifest, out, STEPS, 8), *COMMON]
    survivor, victim = two_machines(_dies("kill", overrides, config), tmp_path / "killed")
    code = survivor.wait(180)
    victim.wait(30)
    died_at = float((tmp_path / "killed" / "died-at").read_text())
    assert survivor.ended_at is not None
    print(f"\nsurvivor exited {survivor.ended_at - died_at:.1f} s after the other machine died")
    assert victim.proc.returncode == -signal.SIGKILL
    text = survivor.output()
    assert code != 0, text[-3000:]
    assert "DistributedRunFailed: process 0 of 2 failed" in text, text[-3000:]
    assert "--resume latest" in text and "step-1" in text
    from modalign.pretrain import checkpoint as ckpt

    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]

    run_ok(_pretrain_program(overrides, config, "--resume", "latest"), tmp_path / "resumed")
    got, want = _weights(out), _weights(straight)
    assert set(got) == set(want)
    for key, w in want.items():
        assert torch.equal(got[key], w), f"{key} differs after the resume"


def test_hung_machine_is_given_up_after_dist_timeout(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest, config = corpus
    overrides = [*tiny_overrides(manifest, tmp_path / "run", STEPS, 8), *COMMON,
                 "train.dist_timeout=20"]  # fmt: skip
    survivor, victim = two_machines(_dies("stop", overrides, config), tmp_path / "hung")
    try:
        code = survivor.wait(180)
        died_at = float((tmp_path / "hung" / "died-at").read_text())
        assert survivor.ended_at is not None
        print(f"\nsurvivor gave up {survivor.ended_at - died_at:.1f} s after the other hung")
    finally:
        victim.kill()  # SIGKILL ends the stopped processes too
    text = survivor.output()
    assert code != 0, text[-3000:]
    assert "train.dist_timeout=20 s" in text, text[-3000:]


def test_machines_without_a_shared_output_dir_are_refused(
    corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    """Same ``output.dir`` string, different folders: each machine resolves the relative path in
    its own working directory, as two hosts with local disks would."""
    manifest, config = corpus
    homes = (tmp_path / "host0", tmp_path / "host1")
    for h in homes:
        h.mkdir()
    overrides = [*tiny_overrides(manifest, Path("run"), STEPS, 8), *COMMON,
                 "train.shared_fs_wait=1"]  # fmt: skip
    machines = two_machines(_pretrain_program(overrides, config), tmp_path / "logs", homes)
    codes = [m.wait(180) for m in machines]
    assert all(codes), "\n".join(m.output()[-3000:] for m in machines)
    for m in machines:
        text = m.output()
        assert "exitcode  : 2" in text, text[-3000:]  # the launcher exits 1 for any failed worker
        assert "output.dir=run: not one folder shared by every machine" in text, text[-3000:]
        assert "train.shared_fs_wait" in text
    assert f"({homes[1] / 'run'}) found no folder" in machines[0].output()
    # nothing left behind: rank 0's folder held only its lock and is removed with the failure
    assert not (homes[0] / "run").exists() and not (homes[1] / "run").exists()


def _json_lines(text: str) -> list[dict]:
    import json

    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_embed_over_two_machines_equals_one_process(
    corpus: tuple[Path, Path], straight: Path, tmp_path: Path
) -> None:
    """``modalign embed`` under the same 2-machine launch splits the shards over the global ranks
    (rank r writes its block into the one --out folder), a relaunch redoes only what a rank
    lost, and ``index build --embeddings`` over the union equals the single-process index."""
    from modalign.cli import main
    from modalign.retrieval.embed_shards import read_embedding_shards
    from modalign.retrieval.index.corpus import CorpusIndex

    manifest, _ = corpus
    args = ["--model", str(straight), "--data", str(manifest), "--shard-rows", "3", "--json"]
    with torch_threads(1):  # the launched ranks run with OMP_NUM_THREADS=1
        assert main(["embed", *args, "--out", str(tmp_path / "one")]) == 0
    program = ["-m", "modalign", "embed", *args, "--out", str(tmp_path / "two")]
    run_ok(program, tmp_path / "launch1")
    written = [_json_lines(m.read_text())[-1]["written"]
               for m in sorted((tmp_path / "launch1").glob("machine*.log"))]  # fmt: skip
    assert written == [3, 3]  # 16 items / 3 per shard = 6 shards: 0-2 on rank 0, 3-5 on rank 1
    # rank 1's machine lost its last shard: the relaunch redoes that one only
    for f in [tmp_path / "two" / "part-000005.done.json",
              *(tmp_path / "two").glob("*/part-000005.*")]:  # fmt: skip
        f.unlink()
    run_ok(program, tmp_path / "launch2")
    again = [_json_lines(m.read_text())[-1]
             for m in sorted((tmp_path / "launch2").glob("machine*.log"))]  # fmt: skip
    assert [(r["written"], r["already_done"]) for r in again] == [(0, 3), (1, 2)]

    one, _ = read_embedding_shards(tmp_path / "one")
    two, _ = read_embedding_shards(tmp_path / "two")
    assert set(one) == set(two) and one
    for m in one:
        assert two[m].ids == one[m].ids
        assert torch.equal(torch.from_numpy(two[m].vectors), torch.from_numpy(one[m].vectors))
    for name in ("one", "two"):
        out = str(tmp_path / f"index-{name}")
        emb = str(tmp_path / name)
        assert main(["index", "build", "--embeddings", emb, "--out", out, "--factory", "Flat"]) == 0
    a, b = CorpusIndex.open(tmp_path / "index-one"), CorpusIndex.open(tmp_path / "index-two")
    assert a.modalities == b.modalities
    for m in a.modalities:
        assert a.indexes[m].ids == b.indexes[m].ids
        queries = one[m].vectors[:5]
        ra, rb = a.indexes[m].search(queries, k=16), b.indexes[m].search(queries, k=16)
        assert ra.ids == rb.ids  # same neighbours, same scores: the same vectors
        assert torch.equal(torch.from_numpy(ra.scores), torch.from_numpy(rb.scores))
