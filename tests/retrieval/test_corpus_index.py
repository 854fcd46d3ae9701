"""CorpusIndex: batched search equals one-at-a-time, modality folders stay inside, writers lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modalign.core.errors import UserInputError
from modalign.retrieval.embed import Embeddings
from modalign.retrieval.index.corpus import CorpusIndex, Query, build_corpus_index


def _emb(modality: str, n: int, dim: int = 16, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"it{i}" for i in range(n)]
    return Embeddings(modality, ids, x, [f"l{i % 3}" for i in range(n)], [f"/v/{i}" for i in ids])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cidx") / "index"
    build_corpus_index({"image": _emb("image", 300), "text": _emb("text", 200, seed=1)}, out, "fp")
    return out


def test_batch_search_equals_one_at_a_time(built: Path) -> None:
    index = CorpusIndex.open(built, expected_fingerprint="fp")
    rng = np.random.default_rng(7)
    qs = rng.standard_normal((40, 16)).astype(np.float32)
    queries = [
        Query(q, k=1 + i % 7, targets=(("image",), ("text",), None)[i % 3])
        for i, q in enumerate(qs)
    ]
    batched = index.search_batch(queries)
    for q, hits in zip(queries, batched):
        alone = index.search(q.vector, k=q.k, targets=q.targets)[0]
        assert [(h.id, h.modality, h.score) for h in hits] == [
            (h.id, h.modality, h.score) for h in alone
        ]
        assert len(hits) == q.k
        assert all(h.modality in (q.targets or ("image", "text")) for h in hits)
    # the merged list is ordered by score across modalities
    merged = batched[2]
    assert [h.score for h in merged] == sorted((h.score for h in merged), reverse=True)
    with pytest.raises(UserInputError, match="k must be >= 1"):
        index.search_batch([Query(qs[0], k=0)])
    with pytest.raises(UserInputError, match="no \\['depth'\\]"):
        index.search_batch([Query(qs[0], targets=("depth",))])


@pytest.mark.parametrize("bad", ["../../x", "/etc", "..", "a/b", ""])
def test_modality_folder_must_stay_inside(built: Path, tmp_path: Path, bad: str) -> None:
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(built, copy)
    meta = json.loads((copy / "index.json").read_text())
    meta["modalities"] = ["image", bad]
    (copy / "index.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match=r"modalities entry .* not a plain folder name") as e:
        CorpusIndex.open(copy)
    assert repr(bad) in str(e.value)


def test_symlinked_modality_folder_is_refused(built: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(built, copy)
    shutil.move(copy / "text", tmp_path / "outside")
    os.symlink(tmp_path / "outside", copy / "text")
    with pytest.raises(UserInputError, match="'text' is not a plain folder name"):
        CorpusIndex.open(copy)


@pytest.mark.distributed  # the CLI in a subprocess
def test_cli_exit_2_names_the_key(built: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(built, copy)
    meta = json.loads((copy / "index.json").read_text())
    meta["modalities"] = ["../../x"]
    (copy / "index.json").write_text(json.dumps(meta))
    code = (
        "import sys; from modalign.core.errors import UserInputError\n"
        "from modalign.retrieval.index.corpus import CorpusIndex\n"
        f"try: CorpusIndex.open({str(copy)!r})\n"
        "except UserInputError as e: print(e); sys.exit(e.exit_code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "modalities entry '../../x'" in proc.stdout


@pytest.mark.distributed  # a lock holder in a subprocess
def test_build_is_locked_and_refuses_foreign_dirs(built: Path, tmp_path: Path) -> None:
    from modalign.core.artifact import DirectoryLocked, lock_dir

    out = tmp_path / "new"
    code = (
        "import sys, time; from pathlib import Path; from modalign.core.artifact import lock_dir\n"
        f"with lock_dir(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(30)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryLocked, match=f"pid {holder.pid}"):
            build_corpus_index({"image": _emb("image", 20)}, out, "fp")
    finally:
        holder.kill()
        holder.wait()
    build_corpus_index({"image": _emb("image", 20)}, out, "fp")  # lock released -> builds
    assert len(CorpusIndex.open(out).indexes["image"]) == 20
    with lock_dir(out):  # re-entrant in one process; the lock file does not block a rebuild
        build_corpus_index({"image": _emb("image", 30)}, out, "fp")
    assert len(CorpusIndex.open(out).indexes["image"]) == 30
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("x")
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        build_corpus_index({"image": _emb("image", 20)}, notes, "fp")
    assert (notes / "keep.txt").read_text() == "x"
