"""``train.keep_best`` / ``train.early_stop``: model selection on validation recall (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from modalign.config import load_config
from modalign.core.errors import ConfigError
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides, write_tiny_corpus

# validation figure by step (val_every=2): best at step 4, then three worse ones
SCRIPT = {2: 0.2, 4: 0.5, 6: 0.3, 8: 0.1, 10: 0.0, 12: 0.05}


def scripted(view: Any, step: int) -> dict[str, Any]:
    return {"audio->image": {"recall@1": SCRIPT[step], "map": 0.0}}


def _cfg(tmp_path: Path, out: str, steps: int, *extra: str) -> Any:
    manifest = write_tiny_corpus(tmp_path / "data", n=16)
    sets = tiny_overrides(manifest, tmp_path / out, steps=steps, batch=8)
    sets += ["model.modalities=[image,audio]", "train.val_every=2", "train.checkpoint_every=2"]
    return load_config(None, [*sets, "train.keep_best=audio->image/recall@1", *extra])


@pytest.mark.slow
def test_bundle_holds_the_best_validated_weights_and_early_stop_ends_the_run(
    tmp_path: Path,
) -> None:
    result = pretrain(_cfg(tmp_path, "run", 12, "train.early_stop=2"), evaluate=scripted)
    out = tmp_path / "run"
    meta = json.loads((out / "modalign.json").read_text())
    assert result.steps == 8 and meta["step"] == 8  # steps 6 and 8 did not beat step 4
    assert meta["selected"] == {"metric": "audio->image/recall@1", "value": 0.5, "step": 4}
    best = json.loads((out / "best" / "modalign.json").read_text())
    assert best["selected"]["step"] == 4 and best["step"] == 4
    final, kept = (
        load_file(out / "model.safetensors"),
        load_file(out / "best" / "model.safetensors"),
    )
    assert final.keys() == kept.keys()
    assert all(bool((final[k] == kept[k]).all()) for k in final)


@pytest.mark.slow
def test_keep_best_resumes_from_its_folder(tmp_path: Path) -> None:
    """Stopped at step 6 and resumed to 12: the same selection as the run straight through."""
    pretrain(_cfg(tmp_path, "straight", 12), evaluate=scripted)
    pretrain(_cfg(tmp_path, "resumed", 6), evaluate=scripted)
    pretrain(_cfg(tmp_path, "resumed", 12), resume="latest", evaluate=scripted)
    for name in ("straight", "resumed"):
        meta = json.loads((tmp_path / name / "modalign.json").read_text())
        assert meta["selected"]["step"] == 4 and meta["step"] == 12


def test_keep_best_needs_validation_and_a_known_figure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.keep_best.*data.val"):
        pretrain(_cfg(tmp_path, "noval", 2))  # no evaluate callback
    with pytest.raises(ConfigError, match="QUERY->GALLERY/METRIC"):
        load_config(None, ["train.keep_best=recall@5"])
    with pytest.raises(ConfigError, match="train.early_stop"):
        load_config(None, ["train.early_stop=3"])
    with pytest.raises(ConfigError, match="gives audio->image/recall@1, audio->image/map"):
        pretrain(
            _cfg(tmp_path, "typo", 2, "train.keep_best=text->image/recall@1"), evaluate=scripted
        )
