"""Benchmark suites: a YAML file (or a built-in name) listing corpora and tasks.

```yaml
name: demo
seed: 0                  # bootstrap and training seeds derive from it
resamples: 1000          # bootstrap draws per figure
corpora:
  demo: {train: runs/demo/corpus/train.jsonl, test: runs/demo/corpus/test.jsonl,
         class_names: [zero, one, ...], inputs: [image, audio]}
finetune: {epochs: 40}   # FinetuneConfig keys for every head a task trains
tasks:
  - {kind: retrieval, options: {level: class}}
  - {kind: few_label, options: {shots: [1, 5, 10], heads: [late]}}
```
Task kinds come from :data:`modalign.benchmark.tasks.TASKS` (plugins: entry-point group
``modalign.benchmark_tasks``); each task's options are checked against its dataclass when the
suite is loaded, before any model is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from modalign.core.config_io import (
    AT_LEAST_1,
    SEED,
    Range,
    apply_override,
    from_dict,
    parse_yaml_mapping,
)
from modalign.core.errors import ConfigError, DataError, UserInputError

__all__ = ["CorpusSpec", "Suite", "TaskSpec", "builtin_suites", "load_suite"]


@dataclass
class CorpusSpec:
    """One labeled corpus: ``train`` (few labels are drawn from it) and held-out ``test``."""

    train: str = ""
    test: str = ""
    class_names: list[str] = field(default_factory=list)  # [] = sorted labels of train
    inputs: list[str] = field(default_factory=lambda: ["image", "audio"])  # classifier inputs
    max_items: Annotated[int, Range(ge=0, note="0 = all")] = (
        0  # 0 = all test items (retrieval, robustness)
    )


@dataclass
class TaskSpec:
    """A registered task kind and its options (validated against the kind's dataclass)."""

    kind: str = "retrieval"
    name: str = ""  # key in the report ("" = kind)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from modalign.benchmark.tasks import TASKS

        TASKS.get(self.kind, "tasks[].kind")
        TASKS.options(self.kind, self.options, f"tasks[{self.kind}].options")
        self.name = self.name or self.kind

    def typed_options(self) -> Any:
        from modalign.benchmark.tasks import TASKS

        return TASKS.options(self.kind, self.options, f"tasks[{self.kind}].options")


@dataclass
class Suite:
    name: str = "suite"
    seed: Annotated[int, SEED] = 0
    resamples: Annotated[int, AT_LEAST_1] = 1000
    corpora: dict[str, CorpusSpec] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    tasks: list[TaskSpec] = field(default_factory=list)

    def check_inputs(self) -> None:
        """Every corpus has train/test sources that exist and parse (before any model is
        loaded): :func:`~modalign.data.preflight.check_source`, the check every run makes."""
        from modalign.data.modality import MODALITIES
        from modalign.data.preflight import check_source

        if not self.corpora:
            raise UserInputError(f"suite {self.name!r} lists no corpora")
        for name, c in self.corpora.items():
            for key in ("train", "test"):
                value = getattr(c, key)
                if not value:
                    raise UserInputError(
                        f"suite {self.name!r}: corpora.{name}.{key} is not set; pass "
                        f"--set corpora.{name}.{key}=PATH (manifest or shard pattern)"
                    )
                try:
                    check_source(value, MODALITIES.names(), f"corpora.{name}.{key}")
                except DataError as exc:
                    raise DataError(
                        f"suite {self.name!r}: {exc} (build the corpus first or pass --set "
                        f"corpora.{name}.{key}=PATH)"
                    ) from None


def _check_modalities(suite: Suite) -> None:
    """Every corpus input names a modality modalign knows (built-in or a plugin's): a task
    that cannot be scored as the suite states is an error, not a silently narrower score."""
    import modalign.data.builtin_modalities  # noqa: F401  (registers image/audio/text)
    from modalign.data.modality import MODALITIES

    for name, corpus in suite.corpora.items():
        unknown = [m for m in corpus.inputs if m not in MODALITIES]
        if unknown:
            raise ConfigError(
                f"corpora.{name}.inputs: {unknown[0]!r} is not a known modality (known: "
                f"{', '.join(MODALITIES.names())}); install the plugin that provides it or "
                "remove it from the suite"
            )
        if not corpus.inputs:
            raise ConfigError(f"corpora.{name}.inputs is empty; list the classifier inputs")


def builtin_suites() -> list[str]:
    root = resources.files("modalign.configs").joinpath("suites")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"suite file {name_or_path!r} not found")
        text, where = path.read_text(encoding="utf-8"), str(path)
    elif name_or_path in builtin_suites():
        res = resources.files("modalign.configs") / "suites" / f"{name_or_path}.yaml"
        text, where = res.read_text(encoding="utf-8"), f"built-in suite {name_or_path!r}"
    else:
        raise ConfigError(
            f"no suite file or built-in suite named {name_or_path!r}; built-in: "
            f"{', '.join(builtin_suites())}"
        )
    tree = parse_yaml_mapping(text, where)
    return tree, where


def load_suite(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """Suite YAML (file or built-in name) <- ``key=value`` overrides, validated."""
    tree, where = _read(name_or_path)
    for assignment in overrides:
        apply_override(tree, assignment)
    suite = from_dict(Suite, tree, "")
    _check_modalities(suite)
    from modalign.finetune.config import FinetuneConfig

    from_dict(FinetuneConfig, dict(suite.finetune), "finetune")  # bad keys fail now
    if not suite.tasks:
        raise ConfigError(f"{where}: the suite lists no tasks")
    names = [t.name for t in suite.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two tasks share a name; give them distinct `name:` keys")
    return suite
