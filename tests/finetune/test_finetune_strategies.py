"""Fine-tuning strategies are registrations: a toy head from this file trains through
``run_finetune`` from config with options and reloads exactly; built-in heads with non-default
options reload; a moved model+classifier pair still loads; the process RNG is left untouched."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from modalign.config import load_config
from modalign.core.artifact import seal_meta
from modalign.core.errors import ConfigError, UserInputError
from modalign.finetune.classifier import load_classifier
from modalign.finetune.head_base import FusionHead
from modalign.finetune.heads import HEADS
from modalign.finetune.pipeline import run_finetune
from modalign.pretrain.trainer import pretrain

from helpers.corpus import WORDS, tiny_overrides
from helpers.trained import TinyBundle


@dataclass(frozen=True)
class ToyOptions:
    scale: float = 1.0
    width: int = 3


class ToyHead(FusionHead):
    """Sum of per-modality linear maps of width ``width`` then a linear classifier, times ``scale``."""

    def __init__(self, dims, num_classes, scale: float, width: int) -> None:
        super().__init__(dims, num_classes)
        self.scale = scale
        self.proj = nn.ModuleList(nn.Linear(self.dims[m], width) for m in self.modalities)
        self.out = nn.Linear(width, num_classes)

    def _fuse(self, inputs, mask):
        h = sum(
            torch.where(mask[:, i, None], p(x), torch.zeros(()))
            for i, (p, x) in enumerate(zip(self.proj, inputs))
        )
        return self.scale * self.out(h)


def _toy(dims, num_classes, opts: ToyOptions) -> FusionHead:
    return ToyHead(dims, num_classes, opts.scale, opts.width)


@pytest.fixture(autouse=True)
def _scoped_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries a test registers are gone after it (other tests list the built-ins)."""
    from modalign.finetune.pseudo.labelers import PSEUDO_LABELERS
    from modalign.finetune.pseudo.thresholds import THRESHOLDS

    for reg in (HEADS, PSEUDO_LABELERS, THRESHOLDS):
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))


@pytest.fixture(scope="module")
def setup(tiny_bundle: TinyBundle) -> TinyBundle:
    """The shared corpus and trained bundle (read-only: copy before changing files)."""
    return tiny_bundle


def _cfg(manifest: Path, model: Path, *extra: str):
    return load_config(
        None,
        [
            f"finetune.model={model}",
            f"finetune.train={manifest}",
            f"finetune.test={manifest}",
            f"finetune.class_names=[{', '.join(WORDS)}]",
            "finetune.labels_per_class=2",
            "finetune.epochs=2",
            "finetune.min_steps=0",
            "finetune.pseudo_label=knn",
            "finetune.threshold=0.0",
            *extra,
        ],
    ).finetune


def test_toy_head_is_one_registration(setup, tmp_path: Path) -> None:
    manifest, model = setup
    HEADS.add("toy_test_head", _toy, ToyOptions, replace=True)
    cfg = _cfg(manifest, model, "finetune.head={kind: toy_test_head, options: {width: 5}}")
    res = run_finetune(cfg, tmp_path / "clf")
    clf = load_classifier(tmp_path / "clf")
    assert isinstance(clf.head, ToyHead)
    assert clf.head.proj[0].out_features == 5 and clf.head.scale == 1.0
    saved = load_file(str(tmp_path / "clf" / "head.safetensors"))
    assert all(torch.equal(v, clf.head.state_dict()[k]) for k, v in saved.items())
    assert clf.evaluate(str(manifest))["accuracy"] == res.fused["accuracy"]
    preds = clf.predict(str(manifest))
    assert len(preds) == 16 and {p["label"] for p in preds} <= set(WORDS)


def test_bad_head_option_names_the_key(setup) -> None:
    manifest, model = setup
    with pytest.raises(ConfigError, match=r"finetune\.head\.options\.ranks"):
        _cfg(manifest, model, "finetune.head={kind: lowrank, options: {ranks: 8}}")
    with pytest.raises(ConfigError, match="lowrank"):
        _cfg(manifest, model, "finetune.head=nope")
    with pytest.raises(ConfigError, match=r"finetune\.pseudo_label_options\.kk"):
        _cfg(manifest, model, "finetune.pseudo_label_options={kk: 3}")


@pytest.mark.parametrize(
    "head, check",
    [
        ("{kind: lowrank, options: {rank: 7, hidden: 16}}", lambda h: h.rank_weights.numel() == 7),
        (
            "{kind: transformer, options: {layers: 3, heads: 2, hidden: 16}}",
            lambda h: len(h.encoder.layers) == 3,
        ),
        ("late", lambda h: h.heads[0][0].out_features == 256),  # the old short form
    ],
)
def test_non_default_options_reload(setup, tmp_path: Path, head: str, check) -> None:
    manifest, model = setup
    run_finetune(_cfg(manifest, model, f"finetune.head={head}"), tmp_path / "clf")
    clf = load_classifier(tmp_path / "clf")
    assert check(clf.head)
    s = clf.embed(str(manifest))
    again = load_classifier(tmp_path / "clf")
    assert torch.equal(clf.head(s.x, s.present), again.head(s.x, s.present))


@pytest.mark.slow  # fine-tunes, then pretrains a second model
def test_moved_pair_still_loads_changed_model_refused(setup, tmp_path: Path) -> None:
    manifest, model = setup
    pair = tmp_path / "pair"
    shutil.copytree(model, pair / "model")
    cfg = _cfg(manifest, pair / "model", "finetune.pseudo_label=none")
    run_finetune(cfg, pair / "model" / "classifier")
    before = load_classifier(pair / "model" / "classifier").predict(str(manifest))
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(pair), str(moved))
    assert load_classifier(moved / "model" / "classifier").predict(str(manifest)) == before
    # Only the classifier moved: its model is not where the relative path says.
    shutil.move(str(moved / "model" / "classifier"), str(tmp_path / "lonely"))
    with pytest.raises(UserInputError, match="move the model and classifier folders together"):
        load_classifier(tmp_path / "lonely")
    # A different model in the classifier's model place is refused.
    shutil.move(str(tmp_path / "lonely"), str(moved / "model" / "classifier"))
    overrides = tiny_overrides(manifest, moved / "model", steps=2, batch=8)
    pretrain(load_config(None, [*overrides, "train.seed=5"]))
    with pytest.raises(UserInputError, match="has changed"):
        load_classifier(moved / "model" / "classifier")


def test_plugin_head_missing_names_package(setup, tmp_path: Path) -> None:
    import json

    manifest, model = setup
    run_finetune(_cfg(manifest, model, "finetune.pseudo_label=none"), tmp_path / "clf")
    meta_path = tmp_path / "clf" / "classifier.json"
    meta = json.loads(meta_path.read_text())
    meta["head"].update(kind="fancy_head", provider="modalign-fancy")
    # as written where the plugin is installed: a sealed classifier.json naming the plugin
    meta_path.write_text(json.dumps(seal_meta(meta)))
    yaml_path = tmp_path / "clf" / "finetune.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("kind: late", "kind: fancy_head"))
    assert "fancy_head" in yaml_path.read_text()
    with pytest.raises(UserInputError, match="modalign-fancy"):
        load_classifier(tmp_path / "clf")


def _rng_state() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.parametrize("labeler", ["knn", "zero_shot"])
def test_rng_untouched_and_runs_deterministic(setup, tmp_path: Path, labeler: str) -> None:
    manifest, model = setup
    cfg = _cfg(manifest, model, f"finetune.pseudo_label={labeler}", "finetune.seed=3")
    torch.manual_seed(1234)
    before = _rng_state()
    run_finetune(cfg, tmp_path / "a")
    after = _rng_state()
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]
    torch.rand(5)  # the process RNG moves on; the next run must not care
    run_finetune(cfg, tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "head.safetensors"))
    b = load_file(str(tmp_path / "b" / "head.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_head_itself_never_touches_global_rng() -> None:
    from modalign.finetune.config import FinetuneConfig
    from modalign.finetune.embedded import EmbeddedSet
    from modalign.finetune.pipeline import train_head

    gen = torch.Generator().manual_seed(0)
    n = 24
    s = EmbeddedSet(
        [str(i) for i in range(n)],
        {"image": torch.randn(n, 8, generator=gen), "audio": torch.randn(n, 8, generator=gen)},
        {"image": torch.rand(n, generator=gen) > 0.2, "audio": torch.rand(n, generator=gen) > 0.2},
        torch.arange(n) % 3,
    )
    cfg = FinetuneConfig(head="transformer", epochs=2, min_steps=0, batch_size=8)  # dropout inside
    before = torch.get_rng_state()
    a = train_head(s, torch.ones(n), 3, cfg, val=s)
    assert torch.equal(before, torch.get_rng_state())
    torch.rand(3)
    b = train_head(s, torch.ones(n), 3, cfg, val=s)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_pseudo_labeler_and_threshold_are_one_registration(setup, tmp_path: Path) -> None:
    from modalign.core.registry import NoOptions
    from modalign.finetune.pseudo.labelers import PSEUDO_LABELERS, Labeler, LabelerOutput
    from modalign.finetune.pseudo.labels import PseudoLabels
    from modalign.finetune.pseudo.thresholds import THRESHOLDS, ConfidenceThreshold, make_threshold

    @dataclass(frozen=True)
    class OracleOptions:
        confidence: float = 1.0

    def oracle(ctx, opts: OracleOptions) -> LabelerOutput:
        y = ctx.pool.y  # the test corpus has every label: an oracle labeler
        return LabelerOutput(PseudoLabels(y, torch.full((len(y),), opts.confidence), "oracle"))

    PSEUDO_LABELERS.add("oracle_test", Labeler(oracle), OracleOptions, replace=True)
    manifest, model = setup
    cfg = _cfg(
        manifest,
        model,
        "finetune.pseudo_label=oracle_test",
        "finetune.pseudo_label_options={confidence: 0.75}",
        "finetune.balance=false",
    )
    res = run_finetune(cfg, tmp_path / "clf")
    assert res.pseudo[0]["method"] == "oracle" and res.pseudo[0]["accuracy"] == 1.0
    assert res.pseudo[0]["coverage"] == 1.0 and res.pseudo[0]["mean_confidence"] == 0.75
    assert "confidence: 0.75" in (tmp_path / "clf" / "finetune.yaml").read_text()

    class HalfThreshold(ConfidenceThreshold):
        def thresholds(self) -> torch.Tensor:
            return torch.tensor([0.5])

    THRESHOLDS.add("half_test", lambda c, n, tau, o: HalfThreshold(), NoOptions, replace=True)
    cut = make_threshold("half_test", 3, 10, 0.95)
    probs = torch.tensor([[0.6, 0.2, 0.2], [0.4, 0.3, 0.3]])
    assert cut.mask(probs).tolist() == [True, False]
    with pytest.raises(ConfigError, match=r"finetune\.threshold_options\.ema"):
        make_threshold("flexmatch", 3, 10, 0.95, {"ema": 0.9})


def test_end_to_end_refuses_an_unlabeled_row(setup) -> None:
    import dataclasses

    from modalign.data.manifest import read_manifest
    from modalign.finetune.end_to_end import train_end_to_end
    from modalign.pretrain.bundle import load_bundle

    manifest, model_dir = setup
    model = load_bundle(model_dir)
    specs = model.modality_specs()
    rows = read_manifest(manifest, specs).rows[:4]
    rows[1] = dataclasses.replace(rows[1], label=None)
    cfg = dataclasses.replace(_cfg(manifest, model_dir), batch_size=4)
    index = {w: i for i, w in enumerate(WORDS)}
    with pytest.raises(UserInputError, match="unlabeled row"):
        train_end_to_end(model.encoder, rows, specs, index, cfg, epochs=1)


@pytest.mark.slow
def test_end_to_end_path_uses_the_shared_loop(setup) -> None:
    import dataclasses

    from modalign.data.manifest import read_manifest
    from modalign.finetune.end_to_end import embed_with, train_end_to_end
    from modalign.finetune.evaluate import evaluate_head
    from modalign.pretrain.bundle import load_bundle
    from modalign.pretrain.model import build_encoder

    manifest, model_dir = setup
    model = load_bundle(model_dir)
    specs = model.modality_specs()
    rows = read_manifest(manifest, specs).rows
    index = {w: i for i, w in enumerate(WORDS)}
    cfg = dataclasses.replace(_cfg(manifest, model_dir), batch_size=8)

    def run() -> tuple[dict, dict]:
        enc = build_encoder(
            dataclasses.replace(model.cfg.model, modalities=list(cfg.inputs)), model.cfg.data
        ).encoder
        head = train_end_to_end(enc, rows, specs, index, cfg, epochs=1)
        ev = evaluate_head(head, embed_with(enc, rows, specs, index, cfg.inputs), len(WORDS))
        return head.state_dict(), ev

    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, ev = run()
    assert ev["items"] == 16 and set(ev["by_subset"]) == {"audio+image", "audio", "image"}
    torch.set_rng_state(state)  # same tower init (built outside the library loop)
    b, _ = run()
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_tampered_head_file_is_refused(setup, tmp_path: Path) -> None:
    manifest, model = setup
    run_finetune(_cfg(manifest, model, "finetune.pseudo_label=none"), tmp_path / "clf")
    assert not [
        p.name for p in (tmp_path / "clf").iterdir() if p.name.startswith((".tmp", ".stage"))
    ]
    head_file = tmp_path / "clf" / "head.safetensors"
    data = bytearray(head_file.read_bytes())
    data[-1] ^= 0xFF
    head_file.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="checksum"):
        load_classifier(tmp_path / "clf")


def test_classifier_and_robustness_read_shards(setup, tmp_path: Path) -> None:
    from modalign.data.pack import pack_shards
    from modalign.finetune.robustness import noise_curve

    manifest, model = setup
    run_finetune(_cfg(manifest, model, "finetune.pseudo_label=none"), tmp_path / "clf")
    clf = load_classifier(tmp_path / "clf")
    packed = pack_shards(manifest, tmp_path / "shards", shard_size=5)
    on_manifest, on_shards = clf.evaluate(str(manifest)), clf.evaluate(packed["pattern"])
    assert on_shards["items"] == on_manifest["items"] == 16
    assert on_shards["accuracy"] == pytest.approx(on_manifest["accuracy"], abs=1e-6)
    curve_m = noise_curve(clf, str(manifest), "audio", levels=(0.0, 1.0))
    curve_s = noise_curve(clf, packed["pattern"], "audio", levels=(0.0, 1.0))
    assert curve_s["items"] == curve_m["items"] > 0
    assert curve_s["accuracy"] == pytest.approx(curve_m["accuracy"], abs=1e-6)  # same noise draws


@pytest.mark.slow
def test_default_auto_records_its_decision_in_classifier_json(setup, tmp_path: Path) -> None:
    """The default ``auto`` labeler cross-validates none / propagation / zero_shot_mix /
    balanced_kmeans / cross_view on the labels (text tower present; the captions are the
    co-training view, read from the manifest in the same embedding pass) and
    ``classifier.json`` keeps the scores and the choice."""
    import json

    manifest, model = setup
    cfg = _cfg(manifest, model, "finetune.pseudo_label=auto", "finetune.views=[text]")
    res = run_finetune(cfg, tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    decision = meta["results"]["pseudo"][0]["auto"]
    assert decision == res.pseudo[0]["auto"]
    assert decision["criterion"] == "cross_validation" and decision["folds"] == 2
    assert set(decision["cv_accuracy"]) == {
        "none", "propagation", "zero_shot_mix", "balanced_kmeans", "cross_view",
    }  # fmt: skip
    assert decision["chosen"] in decision["cv_accuracy"] and not decision["skipped"]
    best = max(decision["cv_accuracy"].values())
    if decision["chosen"] != "none":
        assert decision["cv_accuracy"][decision["chosen"]] == best > decision["cv_accuracy"]["none"]
