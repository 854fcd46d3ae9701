"""Adapters for pretrained towers (LoRA, IA3 ...) through Hugging Face ``peft``.

A tower with ``model.towers.<m>.adapter: {kind: lora, options: {...}}`` keeps its base weights
frozen and trains only the adapter (plus the projection head): the adapter kind is an entry of
:data:`ADAPTERS` whose factory turns its typed options and the target module names into a
``peft`` config, and :func:`inject_adapter` injects it into the trunk in place with
``peft.inject_adapter_in_model`` (the trunk keeps its type; each targeted layer becomes a peft
layer holding ``base_layer`` + the adapter). The targets are the options' ``target_modules``
or, when empty, the default the tower *declares* (``TowerParts.adapter_targets``: attention
and MLP projections for transformers / open_clip, non-depthwise conv + linear layers for timm).

The base of an adapted trunk is a fixed function: its parameters never train and its
normalisation statistics stay as loaded (:func:`freeze_norm_statistics`: BatchNorm layers run
in eval mode while the rest of the trunk trains), so a bundle stores only the adapter tensors
and references the base weights like a frozen tower's (path + sha256). :func:`merge_into_base`
folds the adapter into the base weights (peft's own ``merge``) for a standalone model.

Adding an adapter kind: ``ADAPTERS.add("my_kind", factory, MyOptions)`` where
``factory(options, targets) -> peft.PeftConfig`` and ``MyOptions`` has ``target_modules``; from
another package an entry point in group ``modalign.adapters`` naming ``hook(registry)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from torch import nn

from modalign.core.config_io import AT_LEAST_1, Range
from modalign.core.errors import ConfigError
from modalign.core.registry import Registry

AdapterTargets = str | list[str]
"""peft ``target_modules``: module names (a name matches itself and any ``*.name``) or, as one
string, a regular expression matched against the whole module name."""

TRANSFORMER_TARGETS = (
    r"(?!.*pooler).*\.(query|key|value|dense|q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2"
    r"|intermediate_dense|output_dense)"
)
"""Default targets of transformers towers (hf_*, sentence_transformer): the attention and MLP
projections of BERT / ViT / DINOv2 (query, key, value, dense) and CLIP / HuBERT / wav2vec2
(q/k/v/o/out_proj, fc1/fc2, intermediate_dense / output_dense); the pooler is left out (most
poolings do not use it, and an adapter there would get no gradient)."""


@dataclass
class AdapterConfig:
    """``model.towers.<m>.adapter``: ``kind`` names an :data:`ADAPTERS` entry ("" = none);
    ``options`` are that kind's typed options (checked when the config is built)."""

    kind: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str, lock: str = "none") -> None:
        """Kind registered, options valid and the tower not locked (``lock``: its
        ``lock``), else :class:`ConfigError` naming ``{where}.adapter...`` (``where``: the
        tower's key, ``model.towers.<m>``)."""
        if not self.kind:
            return
        ADAPTERS.get(self.kind, f"{where}.adapter.kind")
        adapter_options(self, where)
        if lock != "none":
            raise ConfigError(
                f"{where}.adapter: an adapted tower keeps its whole base frozen and trains only "
                f"the adapter, so lock={lock!r} has no meaning here; set {where}.lock=none (or "
                "drop the adapter to lock or partly unlock the tower)"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.kind)


@dataclass(frozen=True)
class LoraOptions:
    """``adapter.options`` of ``lora`` (peft ``LoraConfig``): rank ``r``, scale ``alpha / r``,
    dropout on the adapter input; ``target_modules`` [] = the tower's default targets."""

    r: Annotated[int, AT_LEAST_1] = 8
    alpha: Annotated[int, AT_LEAST_1] = 16
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    target_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IA3Options:
    """``adapter.options`` of ``ia3`` (peft ``IA3Config``: learned per-channel scales; a
    ``feedforward_modules`` layer scales its input, the others their output)."""

    target_modules: list[str] = field(default_factory=list)
    feedforward_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoHaOptions:
    """``adapter.options`` of ``loha`` (peft ``LoHaConfig``: low-rank Hadamard product)."""

    r: Annotated[int, AT_LEAST_1] = 8
    alpha: Annotated[int, AT_LEAST_1] = 8
    rank_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    module_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    target_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)


AdapterFactory = Callable[[Any, AdapterTargets], Any]
"""``factory(options, targets) -> peft.PeftConfig`` (``targets``: resolved target modules)."""

ADAPTERS: Registry[AdapterFactory] = Registry("adapter kind", "modalign.adapters")
"""Adapter kinds for ``model.towers.<m>.adapter.kind``: ``lora``, ``ia3``, ``loha``, plugins."""


@ADAPTERS.register("lora", LoraOptions)
def lora_config(opts: LoraOptions, targets: AdapterTargets) -> Any:
    """LoRA: a rank-``r`` update ``B @ A`` (B starts at zero) added to each target layer."""
    from peft import LoraConfig

    return LoraConfig(
        r=opts.r,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=targets,
        exclude_modules=opts.exclude_modules or None,
        bias="none",
    )


@ADAPTERS.register("ia3", IA3Options)
def ia3_config(opts: IA3Options, targets: AdapterTargets) -> Any:
    """IA3: learned per-channel scaling vectors (starting at one) on each target layer."""
    from peft import IA3Config

    return IA3Config(
        target_modules=targets,
        feedforward_modules=opts.feedforward_modules,
        exclude_modules=opts.exclude_modules or None,
    )


@ADAPTERS.register("loha", LoHaOptions)
def loha_config(opts: LoHaOptions, targets: AdapterTargets) -> Any:
    """LoHa: a low-rank Hadamard-product update (starting at zero) on each target layer."""
    from peft import LoHaConfig

    return LoHaConfig(
        r=opts.r,
        alpha=opts.alpha,
        rank_dropout=opts.rank_dropout,
        module_dropout=opts.module_dropout,
        target_modules=targets,
        exclude_modules=opts.exclude_modules or None,
    )


def adapter_options(cfg: AdapterConfig, where: str) -> Any:
    """The typed options of ``cfg`` (``where``: the config key, for errors)."""
    return ADAPTERS.options(cfg.kind, cfg.options, f"{where}.adapter.options")


def candidate_modules(trunk: nn.Module, limit: int = 40) -> list[str]:
    """Names (last component) of the trunk's leaf layers that hold weights: what a
    ``target_modules`` entry can name."""
    names = {
        ".".join(name.split(".")[-2:])
        if name.rsplit(".", 1)[-1].isdigit()
        else name.rsplit(".", 1)[-1]
        for name, mod in trunk.named_modules()
        if name and not any(True for _ in mod.children()) and any(True for _ in mod.parameters())
    }
    return sorted(names)[:limit]


def inject_adapter(
    trunk: nn.Module, cfg: AdapterConfig, default: AdapterTargets | None, where: str
) -> list[str]:
    """Freeze ``trunk`` and inject ``cfg``'s adapter into it in place (peft); returns the names
    of the adapted layers. No target -> :class:`ConfigError` naming ``where`` and listing the
    trunk's candidate layer names (before any training)."""
    from peft import inject_adapter_in_model

    opts = adapter_options(cfg, where)
    targets: AdapterTargets | None = list(opts.target_modules) or default
    key = f"{where}.adapter.options.target_modules"
    if not targets:
        raise ConfigError(
            f"{key}: this tower declares no default adapter targets; list the layers to adapt "
            f"(candidates: {', '.join(candidate_modules(trunk))})"
        )
    trunk.requires_grad_(False)
    peft_cfg = ADAPTERS.get(cfg.kind, f"{where}.adapter.kind").factory(opts, targets)
    try:
        inject_adapter_in_model(peft_cfg, trunk)
    except ValueError as exc:  # peft: no target found / a target of an unsupported layer type
        raise ConfigError(
            f"{key}={targets!r}: {str(exc).splitlines()[0]} (tower {where.rsplit('.', 1)[-1]!r}; "
            f"candidate layer names: {', '.join(candidate_modules(trunk))})"
        ) from None
    adapted = adapted_layers(trunk)
    if not any(p.requires_grad for p in trunk.parameters()):
        raise ConfigError(f"{key}={targets!r}: the adapter on {where} has no trainable parameter")
    return adapted


def adapted_layers(trunk: nn.Module) -> list[str]:
    """Names of the trunk's layers that carry a peft adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, mod in trunk.named_modules() if isinstance(mod, BaseTunerLayer)]


def adapter_parameter_names(trunk: nn.Module) -> set[str]:
    """State-dict names (relative to ``trunk``) of the adapter's own tensors: the trainable
    parameters of an adapted trunk (its base is frozen by construction)."""
    return {name for name, p in trunk.named_parameters() if p.requires_grad}


def freeze_norm_statistics(trunk: nn.Module) -> None:
    """Put the trunk's BatchNorm layers in eval mode: an adapted trunk's base, running
    statistics included, stays as loaded (and has no batch statistics: GradCache-exact)."""
    for mod in trunk.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()


def merge_into_base(trunk: nn.Module) -> int:
    """Fold every adapter of ``trunk`` into its base layer's weights and put the plain base
    layer back (peft's ``merge``, as ``merge_and_unload`` does); returns the layers merged."""
    from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = [name for name, mod in trunk.named_modules() if isinstance(mod, BaseTunerLayer)]
    # A tuner layer inside another one (peft's MultiheadAttention wraps its out_proj) is
    # merged by the outer one, as in peft's own unload.
    names = [n for n in tuners if not any(n.startswith(f"{o}.") for o in tuners if o != n)]
    for name in names:
        layer: Any = trunk.get_submodule(name)  # a peft tuner layer
        parent_name, _, child = name.rpartition(".")
        parent = trunk.get_submodule(parent_name) if parent_name else trunk
        if isinstance(layer, LoraMultiheadAttention):  # unloads its own wrapped out_proj
            base = layer.unload_and_optionally_merge_module(
                merge=True, safe_merge=True, adapter_names=None
            )
        else:
            layer.merge(safe_merge=True)
            base = layer.get_base_layer()
        setattr(parent, child, base)
    # inject_adapter_in_model left its config as a plain attribute of the trunk.
    trunk.__dict__.pop("peft_config", None)
    return len(names)


__all__ = [
    "ADAPTERS",
    "TRANSFORMER_TARGETS",
    "AdapterConfig",
    "AdapterFactory",
    "AdapterTargets",
    "IA3Options",
    "LoHaOptions",
    "LoraOptions",
    "adapted_layers",
    "adapter_parameter_names",
    "candidate_modules",
    "freeze_norm_statistics",
    "inject_adapter",
    "merge_into_base",
]
