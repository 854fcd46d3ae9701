"""Two processes together read every item exactly once per epoch (manifest and shards)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers.data import text_manifest, text_shards

SCRIPT = Path(__file__).resolve().parents[1] / "dist_scripts" / "read_ids.py"


@pytest.mark.distributed
def test_two_processes_read_each_item_once_per_epoch(tmp_path: Path) -> None:
    manifest = text_manifest(tmp_path, 24)  # 4 global batches of 2 x 3
    shards = text_shards(tmp_path / "sh", [5, 7, 6, 9, 3])
    out = tmp_path / "ids"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, str(SCRIPT), str(manifest), shards, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for kind, expected in (
        ("manifest", {f"row{i}" for i in range(24)}),
        ("shards", {f"s{s}-{i:04d}" for s, n in enumerate([5, 7, 6, 9, 3]) for i in range(n)}),
    ):
        per_rank = [json.loads((out / f"{kind}-rank{r}.json").read_text()) for r in range(2)]
        assert all(per_rank), f"{kind}: a rank read nothing"
        assert not set(per_rank[0]) & set(per_rank[1]), f"{kind}: ranks overlap"
        counts = Counter(per_rank[0] + per_rank[1])
        assert set(counts) == expected and max(counts.values()) == 1, kind
