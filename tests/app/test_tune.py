"""`modalign tune`: resumable Optuna studies; best.yaml accepted by finetune/pretrain as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from modalign.cli import main
from modalign.config import load_config
from modalign.core.config_io import to_dict

from helpers.corpus import WORDS, tiny_overrides, write_tiny_corpus


@pytest.fixture(scope="module")
def tune_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tune")
    train = write_tiny_corpus(root / "train", n=48, seed=0)
    test = write_tiny_corpus(root / "test", n=24, seed=1)
    model = root / "model"
    sets = tiny_overrides(train, model, steps=30, batch=16)
    sets += ["train.checkpoint_every=0", "train.val_every=0", "data.val="]
    assert main(["-q", "pretrain", "demo", "--set", *sets]) == 0
    ft = [f"finetune.model={model}", f"finetune.train={train}", f"finetune.test={test}",
          f"finetune.class_names={json.dumps(WORDS)}", "finetune.labels_per_class=1",
          "finetune.epochs=10", "finetune.min_steps=0",
          f"finetune.out={root / 'clf'}"]  # fmt: skip
    return {"root": root, "train": train, "test": test, "model": model, "sets": sets + ft}


def _tune(setup: dict, study: Path, budget: str, *extra: str) -> dict:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    argv = ["tune", "demo", "--budget", budget, "--study", str(study), "--val-per-class", "3",
            "--set", *setup["sets"], *extra, "--json"]  # fmt: skip
    with redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.mark.heavy
@pytest.mark.slow
def test_tune_finetune_resumes_and_never_reads_test(
    tune_setup: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import modalign.finetune.embedded as embedded

    read: list[str] = []
    real = embedded.embed_source

    def spy(model, src, *a, **kw):  # type: ignore[no-untyped-def]
        read.append(str(src))
        return real(model, src, *a, **kw)

    monkeypatch.setattr(embedded, "embed_source", spy)
    import numpy as np
    import torch

    study = tmp_path / "study"
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), torch.get_num_threads())
    first = _tune(tune_setup, study, "3")
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), torch.get_num_threads())
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all()
    assert before[2] == after[2]  # each trial left the process as found
    assert first["trials"] == 3 and first["new_trials"] == 3
    assert read and str(tune_setup["test"]) not in read  # the search never sees test data
    assert (study / "study.db").is_file()
    import optuna

    storage = f"sqlite:///{study / 'study.db'}"
    t0 = optuna.load_study(study_name="finetune", storage=storage).trials[0]
    assert t0.user_attrs["baseline"]  # trial 0 replays the base config (demo + --set)
    base = t0.user_attrs["config"]
    assert base["finetune.head"]["kind"] == "late" and base["finetune.epochs"] == 10
    assert base["finetune.pseudo_label"] == "zero_shot" and base["finetune.lr"] == 2e-3
    # trials 1, 2: the base config with the next labelers of the space, nothing else changed
    t1, t2 = optuna.load_study(study_name="finetune", storage=storage).trials[1:3]
    for t, labeler in ((t1, "none"), (t2, "knn")):
        assert t.user_attrs["neighbour"] == labeler
        want = {**base, "finetune.pseudo_label": labeler, "finetune.pseudo_label_options": {}}
        if labeler == "none":  # no labeler, no threshold
            del want["finetune.threshold"]
        assert t.user_attrs["config"] == want
    cmp = first["baseline"]
    assert cmp["baseline_trial"] == 0 and cmp["rows"] == 3 * len(WORDS)
    assert cmp["difference"] == pytest.approx(cmp["best_score"] - cmp["baseline_score"])
    assert cmp["interval"][0] <= cmp["difference"] <= cmp["interval"][1]
    again = _tune(tune_setup, study, "5")  # resumes from the SQLite storage
    assert again["trials"] == 5 and again["new_trials"] == 2
    assert again["best_value"] >= first["best_value"]
    done = _tune(tune_setup, study, "5")  # budget spent: no new trial
    assert done["new_trials"] == 0
    for name in ("best.yaml", "trials.csv", "trials.md", "history.png"):
        assert (study / name).stat().st_size > 100, name
    rows = (study / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 5  # the neighbours still queued are not listed as trials
    waiting = optuna.load_study(study_name="finetune", storage=storage).get_trials(
        states=(optuna.trial.TrialState.WAITING,)
    )
    # 5 trials ran: trial 0 and the neighbours none, knn, propagation, zero_shot_mix
    assert [t.user_attrs["neighbour"] for t in waiting] == ["balanced_kmeans", "auto"]
    assert "WAITING" not in (study / "trials.md").read_text()
    best = yaml.safe_load((study / "best.yaml").read_text())
    assert "base config (trial 0)" in (study / "best.yaml").read_text().splitlines()[1]
    assert best["finetune"]["head"]["kind"] == again["best_params"]["finetune.head"]["kind"]
    assert best["finetune"]["lr"] == pytest.approx(again["best_params"]["finetune.lr"])
    monkeypatch.undo()
    # best.yaml is a config `modalign finetune` accepts as is
    assert main(["-q", "finetune", str(study / "best.yaml")]) == 0
    meta = json.loads((tune_setup["root"] / "clf" / "classifier.json").read_text())
    assert meta["head"]["kind"] == best["finetune"]["head"]["kind"]


@pytest.mark.slow
def test_tune_metric_accuracy_and_a_study_keeps_its_metric(
    tune_setup: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import optuna

    study = tmp_path / "study"
    # the config's labeler is outside the search space's list: trial 0 still replays it
    res = _tune(tune_setup, study, "1", "--metric", "accuracy", "--label-splits", "2",
                "--set", "finetune.pseudo_label=self_training")  # fmt: skip
    trials = optuna.load_study(study_name="finetune", storage=f"sqlite:///{study / 'study.db'}")
    assert trials.user_attrs["metric"] == "accuracy" and trials.user_attrs["label_splits"] == 2
    assert trials.trials[0].user_attrs["config"]["finetune.pseudo_label"] == "self_training"
    assert res["baseline"]["best_trial"] == res["baseline"]["baseline_trial"] == 0
    ran = trials.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(ran) == 1  # the budget; the base config's neighbours wait in the storage
    for t in ran:  # each trial's value is its validation accuracy, not the subset mean
        assert t.value == pytest.approx(t.user_attrs["accuracy"])
        assert set(t.user_attrs["by_subset"]) == {"audio", "image", "audio+image"}
        # scored on two label splits (seeds 0 and 1), the value their mean
        assert len(t.user_attrs["by_split"]) == 2
        assert t.value == pytest.approx(sum(t.user_attrs["by_split"]) / 2)
    assert res["best_value"] == pytest.approx(max(t.value for t in ran))

    import modalign.finetune.embedded as embedded

    def never(*a, **kw):  # type: ignore[no-untyped-def]
        raise AssertionError("embedded before the metric was checked")

    monkeypatch.setattr(embedded, "embed_source", never)
    argv = ["-q", "tune", "demo", "--budget", "3", "--study", str(study), "--set",
            *tune_setup["sets"]]  # fmt: skip
    assert main(argv) == 2  # resumed with the default metric (subsets): refused, nothing embedded
    # a new study whose own labeler this config cannot run (cross_view without views): trial 0
    # could not replay it; refused naming the key, before anything is embedded
    fresh = ["-q", "tune", "demo", "--budget", "3", "--study", str(tmp_path / "fresh"), "--set",
             *tune_setup["sets"], "finetune.pseudo_label=cross_view"]  # fmt: skip
    assert main(fresh) == 2
    assert main([*argv, "--metric", "accuracy"]) == 2  # resumed with one label split: refused
    assert main([*argv, "--metric", "f1"]) == 2  # unknown metric
    assert main([*argv[:-len(tune_setup["sets"]) - 1], "--stage", "pretrain", "--metric",
                 "accuracy"]) == 2  # fmt: skip


@pytest.mark.slow
def test_tune_pretrain_stage_best_yaml_pretrains(tune_setup: dict, tmp_path: Path) -> None:
    study = tmp_path / "pstudy"
    extra = ["--stage", "pretrain", "--set", "train.steps=4", "train.val_every=2",
             f"data.val={tune_setup['test']}", f"output.dir={tmp_path / 'final'}"]  # fmt: skip
    res = _tune(tune_setup, study, "2", *extra)
    assert res["trials"] == 2 and 0.0 <= res["best_value"] <= 1.0
    assert {"optim.lr", "model.embed_dim", "train.batch_size"} <= set(res["best_params"])
    assert (study / "trials" / "0000" / "model.safetensors").is_file()
    import optuna

    trials = optuna.load_study(study_name="pretrain", storage=f"sqlite:///{study / 'study.db'}")
    t0 = trials.trials[0]
    assert t0.user_attrs["baseline"]  # trial 0 replays the base config (demo + --set)
    demo = load_config("demo", [*tune_setup["sets"], *extra[3:]])
    assert t0.user_attrs["config"] == {
        "optim.lr": demo.optim.lr, "loss.init_temperature": demo.loss.init_temperature,
        "model.embed_dim": demo.model.embed_dim, "train.batch_size": demo.train.batch_size,
        "data.image.train_scale_min": demo.data.image.train_scale_min,
        "data.image.hflip": demo.data.image.hflip,
        "data.audio.spec_augment": demo.data.audio.spec_augment,
    }  # fmt: skip
    # each finished trial keeps its last validation's hits at rank 1, every pair's queries
    queries = len(tune_setup["test"].read_text().splitlines())
    for t in trials.trials:
        pairs = len(demo.model.modalities) * (len(demo.model.modalities) - 1)  # ordered pairs
        assert t.user_attrs["rows"] == pairs * queries
    cmp = res["baseline"]
    assert cmp["measure"] == "recall@1" and cmp["unit"] == "queries"
    assert cmp["baseline_trial"] == 0
    assert cmp["difference"] == pytest.approx(cmp["best_score"] - cmp["baseline_score"])
    assert cmp["best_score"] == pytest.approx(res["best_value"])  # equal query counts per pair
    best = yaml.safe_load((study / "best.yaml").read_text())
    assert best["model"]["embed_dim"] == res["best_params"]["model.embed_dim"]
    assert main(["-q", "pretrain", str(study / "best.yaml")]) == 0
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_pretrain_space_replays_the_base_config_and_never_augments_more() -> None:
    """Trial 0 of a pretrain study replays the base config exactly (adapter, augmentation and
    SpecAugment included); any other suggestion weakens the image augmentation at most."""
    import optuna

    from modalign.tune.finetune_stage import config_with
    from modalign.tune.space import PretrainSpace

    sets = ["model.modalities=[audio,image]", "data.image.train_scale_min=0.3",
            "data.image.hflip=0.25", "data.audio.spec_augment=true", "optim.lr=0.003",
            "loss.init_temperature=0.05", "model.embed_dim=96", "train.batch_size=24",
            "model.towers.image.adapter.kind=lora", "model.towers.image.adapter.options.r=8",
            "model.towers.image.adapter.options.target_modules=[conv_pw]"]  # fmt: skip
    tree = to_dict(load_config(None, sets))
    space = PretrainSpace.around(tree)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(space.baseline(tree))
    replay = to_dict(config_with(tree, space.suggest(study.ask())))
    assert replay == tree
    scales, flips, spec = set(), set(), set()
    for _ in range(40):
        cfg = config_with(tree, space.suggest(study.ask()))
        assert 0.3 <= cfg.data.image.train_scale_min <= 1.0 and 0.0 <= cfg.data.image.hflip <= 0.25
        scales.add(round(cfg.data.image.train_scale_min, 1))
        flips.add(cfg.data.image.hflip == 0.0)
        spec.add(cfg.data.audio.spec_augment)
    assert len(scales) > 3 and spec == {True, False}
    study.enqueue_trial({**space.baseline(tree), "augmentation": 0.0})
    none = config_with(tree, space.suggest(study.ask()))
    assert none.data.image.train_scale_min == 1.0 and none.data.image.hflip == 0.0
    # no audio modality: SpecAugment is not a searched key
    image_only = to_dict(load_config(None, ["model.modalities=[image,text]"]))
    trial = optuna.create_study().ask()  # its own study: other embed_dim / batch choices
    assert "data.audio.spec_augment" not in PretrainSpace.around(image_only).suggest(trial)


def test_budget_parsing_and_errors() -> None:
    from modalign.core.errors import UserInputError
    from modalign.tune.budget import Budget, parse_budget

    assert parse_budget("20") == Budget(trials=20)
    assert parse_budget("30m") == Budget(seconds=1800.0)
    assert parse_budget("1.5h") == Budget(seconds=5400.0)
    for bad in ("0", "ten", "5d", "-3"):
        with pytest.raises(UserInputError):
            parse_budget(bad)
    assert main(["tune", "demo", "--budget", "soon"]) == 2


def test_head_option_grid_stays_at_or_below_the_registered_default() -> None:
    import dataclasses

    import optuna

    from modalign.finetune.heads import HEADS
    from modalign.tune.space import FinetuneSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[tuple[str, str], set[int]] = {}
    for _ in range(150):
        head = FinetuneSpace().suggest(study.ask())["finetune.head"]
        for name, value in head["options"].items():
            if isinstance(value, int) and not isinstance(value, bool):
                seen.setdefault((head["kind"], name), set()).add(value)
    assert {kind for kind, _ in seen} == set(HEADS.names())
    for (kind, name), values in seen.items():
        default = getattr(HEADS.get(kind).options(), name)
        # larger heads multiply a trial's cost (the slow transformer trials of issue 13)
        assert values == {max(1, default // 4), max(1, default // 2), default}, (kind, name)
    fields = {f.name for f in dataclasses.fields(HEADS.get("transformer").options)}
    assert {"hidden", "layers", "heads"} <= fields


def test_finetune_space_offers_the_default_labeler() -> None:
    """``auto`` (the default) is in the space: a tuned head can keep the default labeler."""
    import optuna

    from modalign.finetune.config import FinetuneConfig
    from modalign.tune.space import FinetuneSpace

    space = FinetuneSpace()
    assert FinetuneConfig().pseudo_label in space.pseudo_labels
    trial = optuna.trial.FixedTrial(
        {"head": "late", "head.late.hidden": 256, "head.late.dropout": 0.1,
         "pseudo_label": "auto", "lr": 0.006, "weight_decay": 1e-4, "epochs": 60,
         "modality_dropout": 0.3, "threshold": 0.5}
    )  # fmt: skip
    params = space.suggest(trial)
    assert params["finetune.pseudo_label"] == "auto"
    assert params["finetune.head"]["kind"] == "late" and params["finetune.lr"] == 0.006


def test_the_baseline_trial_replays_the_base_config() -> None:
    """``FinetuneSpace.baseline``: an enqueued trial suggests exactly the base config's values,
    also a head size outside the registered grid and a labeler's own options."""
    import optuna

    from modalign.core.config_io import to_dict
    from modalign.core.errors import UserInputError
    from modalign.finetune.config import FinetuneConfig
    from modalign.tune.space import FinetuneSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ft = to_dict(FinetuneConfig())
    ft.update(lr=3e-3, epochs=70, weight_decay=1e-3, modality_dropout=0.2, threshold=0.6,
              pseudo_label="knn", head={"kind": "gated", "options": {"hidden": 96}})  # fmt: skip
    space = FinetuneSpace(labeler_options={"knn": {"k": 7}}, head_options={"gated": {"hidden": 96}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(space.baseline(ft))
    got = space.suggest(study.ask())
    assert got["finetune.head"]["kind"] == "gated"
    assert got["finetune.head"]["options"]["hidden"] == 96  # not in {64, 128, 256}'s grid
    for key in ("lr", "epochs", "weight_decay", "modality_dropout", "threshold", "pseudo_label"):
        assert got[f"finetune.{key}"] == ft[key], key
    assert got["finetune.pseudo_label_options"] == {"k": 7}
    with pytest.raises(UserInputError, match="finetune.pseudo_label 'cross_view'"):
        FinetuneSpace(pseudo_labels=["none", "knn"]).baseline({**ft, "pseudo_label": "cross_view"})


def test_neighbours_change_only_the_labeler() -> None:
    """``FinetuneSpace.neighbours``: one trial per other labeler of the space, in its order, each
    replaying the base config but for the labeler (and a threshold only where one is used)."""
    import optuna

    from modalign.core.config_io import to_dict
    from modalign.finetune.config import FinetuneConfig
    from modalign.tune.space import FinetuneSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ft = to_dict(FinetuneConfig())
    ft.update(lr=3e-3, epochs=70, threshold=0.6, pseudo_label="knn", head={"kind": "late"})
    space = FinetuneSpace(pseudo_labels=["none", "knn", "propagation", "auto"],
                          labeler_options={"knn": {"k": 7}})  # fmt: skip
    base = space.baseline(ft)
    near = space.neighbours(ft)
    assert [p["pseudo_label"] for p in near] == ["none", "propagation", "auto"]
    assert near[0] == {k: v for k, v in base.items() if k != "threshold"} | {"pseudo_label": "none"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for params in near:
        study.enqueue_trial(params)
    for params in near:
        got = space.suggest(study.ask())
        assert got["finetune.pseudo_label"] == params["pseudo_label"]
        assert got["finetune.pseudo_label_options"] == {}  # the swapped-in labeler's defaults
        for key in ("lr", "epochs", "weight_decay", "modality_dropout"):
            assert got[f"finetune.{key}"] == ft[key], key
        assert got.get("finetune.threshold") == (None if params["pseudo_label"] == "none" else 0.6)
    none_base = space.neighbours({**ft, "pseudo_label": "none"})  # a threshold comes back
    assert [p.get("threshold") for p in none_base] == [0.6, 0.6, 0.6]


def test_best_against_baseline_is_paired_on_the_validation_rows() -> None:
    """The comparison reads each trial's per-row outcomes: a best trial right where the
    baseline is wrong is told apart; one that differs on a few rows is not."""
    import numpy as np
    import optuna

    from modalign.benchmark.figures import pack_outcomes
    from modalign.tune.outputs import comparison_text
    from modalign.tune.study import compare_with_baseline

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def trial(hits: np.ndarray, baseline: bool = False) -> optuna.trial.FrozenTrial:
        attrs = {"hits": pack_outcomes(hits), "rows": len(hits), "baseline": baseline}
        return optuna.trial.create_trial(
            params={"x": 0.5}, distributions=dist, value=float(hits.mean()), user_attrs=attrs
        )

    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.5
    for best, apart in ((base | (rng.random(200) < 0.5), True), (base.copy(), False)):
        best[:3] = True  # three more rows right: never enough on 200 rows
        study = optuna.create_study(direction="maximize")
        study.add_trial(trial(base, baseline=True))
        study.add_trial(trial(best))
        cmp = compare_with_baseline(study)
        assert cmp is not None and cmp["rows"] == 200
        assert cmp["difference"] == pytest.approx(best.mean() - base.mean())
        assert cmp["distinguishable"] is apart, cmp
        assert ("beyond the interval" in comparison_text(cmp)) is apart
    lone = optuna.create_study(direction="maximize")
    lone.add_trial(trial(base))  # no baseline trial (a study made before 0.3): no comparison
    assert compare_with_baseline(lone) is None
    bare = optuna.trial.create_trial(params={"x": 0.9}, distributions=dist, value=1.0)
    lone.add_trial(trial(base, baseline=True))
    lone.add_trial(bare)  # the best trial kept no hits (e.g. its validation had no pair)
    assert compare_with_baseline(lone) is None
    assert "n = 200 queries" in comparison_text(compare_with_baseline(study, "recall@1", "queries"))
