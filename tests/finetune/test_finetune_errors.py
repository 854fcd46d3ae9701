"""Fine-tuning refuses bad setups before any training, naming the cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modalign.config import load_config
from modalign.core.errors import UserInputError
from modalign.finetune.pipeline import run_finetune

from helpers.corpus import WORDS
from helpers.trained import TinyBundle


@pytest.fixture(scope="module")
def setup(tiny_bundle: TinyBundle, tiny_bundle_no_text: TinyBundle) -> tuple[Path, Path, Path]:
    """The shared corpus, a model with and one without a text tower (read-only)."""
    return tiny_bundle.corpus, tiny_bundle.model, tiny_bundle_no_text.model


def finetune_cfg(manifest: Path, model: Path, *extra: str):
    return load_config(
        None,
        [
            f"finetune.model={model}",
            f"finetune.train={manifest}",
            f"finetune.test={manifest}",
            f"finetune.class_names=[{', '.join(WORDS)}]",
            "finetune.labels_per_class=2",
            "finetune.epochs=1",
            *extra,
        ],
    ).finetune


def test_label_outside_class_list(setup, tmp_path: Path) -> None:
    manifest, full, _ = setup
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[5]["label"] = "eleven"
    bad.write_text(
        "".join(
            json.dumps(
                {
                    **r,
                    "image": str(manifest.parent / r["image"]),
                    "audio": str(manifest.parent / r["audio"]),
                }
            )
            + "\n"
            for r in rows
        )
    )
    with pytest.raises(UserInputError, match="'eleven', not in the class list"):
        run_finetune(finetune_cfg(bad, full), tmp_path / "clf")


def test_class_without_labels_and_k_too_large(setup, tmp_path: Path) -> None:
    manifest, full, _ = setup
    with pytest.raises(UserInputError, match="class 'five' has no labeled example"):
        run_finetune(
            finetune_cfg(manifest, full, f"finetune.class_names=[{', '.join([*WORDS, 'five'])}]"),
            tmp_path / "a",
        )
    with pytest.raises(UserInputError, match="fewer than labels_per_class"):
        run_finetune(finetune_cfg(manifest, full, "finetune.labels_per_class=9"), tmp_path / "b")


def test_zero_shot_needs_text_tower(setup, tmp_path: Path) -> None:
    manifest, _, no_text = setup
    with pytest.raises(UserInputError, match="needs a text tower"):
        run_finetune(
            finetune_cfg(manifest, no_text, "finetune.pseudo_label=zero_shot"), tmp_path / "c"
        )
    # the same model works with a pseudo-labeler that needs no text
    res = run_finetune(finetune_cfg(manifest, no_text, "finetune.pseudo_label=knn"), tmp_path / "d")
    assert res.pseudo[0]["method"].startswith("knn")


def test_input_modality_the_model_lacks(setup, tmp_path: Path) -> None:
    manifest, full, _ = setup
    with pytest.raises(UserInputError, match="no such tower"):
        run_finetune(
            finetune_cfg(
                manifest, full, "finetune.inputs=[image, depth]", "finetune.pseudo_label=none"
            ),
            tmp_path / "e",
        )
    assert not (tmp_path / "e").exists()  # nothing written before the error
