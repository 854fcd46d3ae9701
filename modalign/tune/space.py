"""Search spaces: fine-tuning keys (heads' options from the head registry) and pretraining keys.

A space turns an Optuna trial into ``--set``-style overrides (``{"finetune.lr": 0.001, ...}``),
so the best trial is written back as a config ``modalign finetune``/``pretrain`` accepts as is.
Head options come from each head's options dataclass: ints from {default/4, default/2, default}
(never above the registered default: a head's default size is already its generous one, and
larger sizes multiply a trial's cost -- the transformer head's step already costs ~20x the late
head's at default size, and 4 layers double that; the base config's own value joins the grid),
floats from a range around it, bools both ways; other types keep the base config's value.
:meth:`FinetuneSpace.baseline` / :meth:`PretrainSpace.baseline` give the parameters that replay
the base config: a study's first trial, the reference its best is compared with;
:meth:`FinetuneSpace.neighbours` the base config with each other labeler, the trials that follow
it in a fine-tuning study.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modalign.core.errors import UserInputError
from modalign.finetune.heads import HEADS

__all__ = ["FinetuneSpace", "PretrainSpace", "head_option_params"]


def _suggest_field(
    trial: Any, name: str, f: dataclasses.Field, default: Any, given: Any = None
) -> Any:
    if isinstance(default, bool):
        return trial.suggest_categorical(name, [True, False])
    if isinstance(default, int) and default >= 1:
        grid = {max(1, default // 4), max(1, default // 2), default}
        if isinstance(given, int) and not isinstance(given, bool) and given >= 1:
            grid.add(given)  # the base config's own value, so its trial can be replayed
        return trial.suggest_categorical(name, sorted(grid))
    if isinstance(default, float) and 0.0 <= default < 1.0:
        return trial.suggest_float(name, 0.0, min(0.6, max(0.3, 3 * default)))
    if isinstance(default, float) and default >= 1.0:
        return trial.suggest_float(name, default / 4, default * 4, log=True)
    return default if given is None else given  # not searched: the base config's value


def head_option_params(
    trial: Any, kind: str, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Every option of head ``kind`` suggested from its dataclass field (named per kind);
    ``given`` (the base config's options of this head) join the integer grids."""
    cls = HEADS.get(kind).options
    defaults, given = cls(), given or {}
    return {
        f.name: _suggest_field(
            trial, f"head.{kind}.{f.name}", f, getattr(defaults, f.name), given.get(f.name)
        )
        for f in dataclasses.fields(cls)
    }


@dataclass(frozen=True)
class FinetuneSpace:
    heads: list[str] = field(default_factory=list)  # [] = every registered head
    # auto: modalign's default labeler, so a trial can keep it and change the head, lr, epochs
    pseudo_labels: list[str] = field(
        default_factory=lambda: [
            "none",
            "zero_shot",
            "knn",
            "propagation",
            "zero_shot_mix",
            "balanced_kmeans",
            "cross_view",
            "auto",
        ]
    )
    # the base config's labeler options, kept for that labeler (others get their defaults)
    labeler_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the base config's head options by kind: their integer values join the grids
    head_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def head_kinds(self) -> list[str]:
        """The heads searched: ``heads``, or every registered head when it is empty."""
        return list(self.heads) or HEADS.names()

    def suggest(self, trial: Any) -> dict[str, Any]:
        kind = trial.suggest_categorical("head", self.head_kinds())
        pl = trial.suggest_categorical("pseudo_label", list(self.pseudo_labels))
        options = head_option_params(trial, kind, self.head_options.get(kind))
        out: dict[str, Any] = {
            "finetune.head": {"kind": kind, "options": options},
            "finetune.lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
            "finetune.weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
            "finetune.epochs": trial.suggest_int("epochs", 10, 120, step=10),
            "finetune.modality_dropout": trial.suggest_float("modality_dropout", 0.0, 0.6),
            "finetune.pseudo_label": pl,
            "finetune.pseudo_label_options": dict(self.labeler_options.get(pl, {})),
        }
        if pl != "none":
            out["finetune.threshold"] = trial.suggest_float("threshold", 0.0, 0.95)
        return out

    def baseline(self, ft: Mapping[str, Any]) -> dict[str, Any]:
        """The trial parameters that replay the base config's ``finetune`` block ``ft`` (the
        study's first trial, so every study scores the configuration it is asked to improve).

        A value outside a float range is replayed as is (Optuna warns); the head and labeler
        must be among the space's choices (``run_tune`` adds the config's labeler when this model
        can run it; UserInputError naming the key otherwise)."""
        kind, pl = ft["head"]["kind"], ft["pseudo_label"]
        if kind not in self.head_kinds():
            raise UserInputError(f"finetune.head.kind {kind!r} is not in the tune space")
        if pl not in self.pseudo_labels:
            raise UserInputError(
                f"finetune.pseudo_label {pl!r} is not usable here (tune space: "
                f"{', '.join(self.pseudo_labels)}); the labeler's own check says why when "
                "`modalign finetune` runs this config"
            )
        opts = HEADS.options_dict(
            kind, HEADS.options(kind, ft["head"].get("options"), "finetune.head.options")
        )
        params: dict[str, Any] = {
            "head": kind,
            "pseudo_label": pl,
            **{f"head.{kind}.{k}": v for k, v in opts.items()},
            "lr": ft["lr"],
            "weight_decay": ft["weight_decay"],
            "epochs": ft["epochs"],
            "modality_dropout": ft["modality_dropout"],
        }
        if pl != "none":
            params["threshold"] = ft["threshold"]
        return params

    def neighbours(self, ft: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The base config with its labeler swapped for each other labeler of the space, in the
        space's order (head, lr, epochs, threshold kept; the labeler's own default options).

        A study scores these right after the baseline: the labeler is the choice that moves
        accuracy most on the few-label suites, and a sampler's first (random) trials change
        every key at once, so a short budget would otherwise rarely compare labelers on equal
        terms."""
        self.baseline(ft)  # the base config itself must fit the space
        return [
            self.baseline({**ft, "pseudo_label": pl})
            for pl in self.pseudo_labels
            if pl != ft["pseudo_label"]
        ]


def _targets_name(targets: list[str]) -> str:
    return ",".join(targets) or "default"


def _adapter_options(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Each adapted tower's adapter options (``model.towers.<m>.adapter``), typed."""
    from modalign.pretrain.towers.adapters import ADAPTERS

    out: dict[str, Any] = {}
    for m in tree["model"]["modalities"]:
        tower = tree["model"]["towers"].get(m) or {}
        adapter = tower.get("adapter") or {}
        if adapter.get("kind"):
            out[m] = ADAPTERS.options(
                adapter["kind"], adapter.get("options"), f"model.towers.{m}.adapter.options"
            )
    return out


@dataclass(frozen=True)
class PretrainSpace:
    """Pretraining keys; for adapted towers (``model.towers.<m>.adapter``) also the adapter's
    rank (``adapter_ranks[m]``, for kinds with an ``r`` option) and target set
    (``adapter_targets[m]``: lists of module names, [] = the tower's default targets).

    ``augmentation`` (one float in [0, 1]) scales the image augmentation from none (0: whole
    image, no flips) to the base config's own (1: its ``data.image.train_scale_min`` and
    ``hflip``, kept in ``image_scale_min`` / ``image_hflip``), so the search can weaken
    augmentation a corpus does not suit (a flipped arrow icon is another icon) but never goes
    beyond what the config asked for; with an audio modality ``spec_augment`` is searched on
    and off (the config's mask sizes)."""

    embed_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    batch_sizes: list[int] = field(default_factory=lambda: [32, 64, 128])
    adapter_ranks: dict[str, list[int]] = field(default_factory=dict)
    adapter_targets: dict[str, list[list[str]]] = field(default_factory=dict)
    image_scale_min: float = 0.08
    image_hflip: float = 0.5
    audio: bool = False

    def adapter_params(self, trial: Any) -> dict[str, Any]:
        """The adapter dimensions: ``model.towers.<m>.adapter.options.r`` / ``target_modules``."""
        out: dict[str, Any] = {}
        for m, ranks in self.adapter_ranks.items():
            r = trial.suggest_categorical(f"adapter.{m}.r", sorted(set(ranks)))
            out[f"model.towers.{m}.adapter.options.r"] = r
        for m, sets in self.adapter_targets.items():
            by_name = {_targets_name(list(t)): list(t) for t in sets}
            name = trial.suggest_categorical(f"adapter.{m}.targets", list(by_name))
            out[f"model.towers.{m}.adapter.options.target_modules"] = by_name[name]
        return out

    @classmethod
    def around(cls, tree: dict[str, Any]) -> PretrainSpace:
        """The space around a config tree's own sizes: embed dim {d/2, d, 2d}, batch {b/2, b},
        adapter rank {r/2, r, 2r} and target set {the config's, the tower's default}, and its
        augmentation as the strongest one searched."""
        d, b = tree["model"]["embed_dim"], tree["train"]["batch_size"]
        ranks: dict[str, list[int]] = {}
        targets: dict[str, list[list[str]]] = {}
        for m, opts in _adapter_options(tree).items():
            if "r" in {f.name for f in dataclasses.fields(opts)}:  # a rank to search
                ranks[m] = sorted({max(1, opts.r // 2), opts.r, opts.r * 2})
            own = list(opts.target_modules)
            targets[m] = [own, []] if own else [[]]
        image = tree["data"]["image"]
        return cls(
            embed_dims=sorted({max(8, d // 2), d, d * 2}),
            batch_sizes=sorted({max(2, b // 2), b}),
            adapter_ranks=ranks,
            adapter_targets={m: t for m, t in targets.items() if len(t) > 1},
            image_scale_min=float(image["train_scale_min"]),
            image_hflip=float(image["hflip"]),
            audio="audio" in tree["model"]["modalities"],
        )

    def suggest(self, trial: Any) -> dict[str, Any]:
        aug = trial.suggest_float("augmentation", 0.0, 1.0)
        out = {
            **self.adapter_params(trial),
            "optim.lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
            "loss.init_temperature": trial.suggest_float("init_temperature", 0.02, 0.2, log=True),
            "model.embed_dim": trial.suggest_categorical("embed_dim", list(self.embed_dims)),
            "train.batch_size": trial.suggest_categorical("batch_size", list(self.batch_sizes)),
            # aug = 1 gives the base values exactly (the baseline trial replays them)
            "data.image.train_scale_min": self.image_scale_min
            + (1.0 - self.image_scale_min) * (1.0 - aug),
            "data.image.hflip": self.image_hflip * aug,
        }
        if self.audio:
            out["data.audio.spec_augment"] = trial.suggest_categorical(
                "spec_augment", [False, True]
            )
        return out

    def baseline(self, tree: Mapping[str, Any]) -> dict[str, Any]:
        """The trial parameters that replay the base config ``tree`` (a pretrain study's first
        trial, the reference its best is compared with). A value outside a float range (lr,
        temperature) is replayed as is (Optuna warns)."""
        params: dict[str, Any] = {
            "augmentation": 1.0,
            "lr": tree["optim"]["lr"],
            "init_temperature": tree["loss"]["init_temperature"],
            "embed_dim": tree["model"]["embed_dim"],
            "batch_size": tree["train"]["batch_size"],
        }
        if self.audio:
            params["spec_augment"] = bool(tree["data"]["audio"]["spec_augment"])
        adapters = _adapter_options(tree)
        for m in self.adapter_ranks:
            params[f"adapter.{m}.r"] = adapters[m].r
        for m in self.adapter_targets:
            params[f"adapter.{m}.targets"] = _targets_name(list(adapters[m].target_modules))
        return params
