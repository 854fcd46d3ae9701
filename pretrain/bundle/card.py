"""The model card (``README.md``) of a bundle: YAML front matter + a human-readable body.

The front matter follows the Hugging Face model-card conventions (``library_name``, ``tags``,
``license``, ``pipeline_tag``) and holds modalign's own facts under one ``modalign:`` key:
modalities, ``embed_dim``, every base tower with its source, path, licence and weight sha256,
a training data summary, the metrics of the last ``evaluate``/``benchmark`` (each with its 95%
interval and ``n``), the exact command and the modalign version. The body is rendered from
the front matter alone, so an update (new metrics) parses the card, changes one key and renders
it again.

The card is documentation, not part of the model: it is written after ``modalign.json`` and is
not among the files whose sha256 the bundle verifies, so editing it (or a hub client rewriting
its metadata) never makes a bundle unloadable. Instead the card seals itself: its front matter
carries ``modalign.card_sha256``, the sha256 of the card text with that value zeroed. modalign
rewrites a ``README.md`` only when it is absent or still carries a matching seal (a card it
wrote and nobody changed since); any other ``README.md`` is left exactly as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from modalign.core.artifact import ArtifactWriteError, DirectoryLocked, atomic_write_text, lock_dir
from modalign.core.errors import UserInputError
from modalign.core.invocation import current_command
from modalign.core.version import __version__
from modalign.pretrain.bundle.meta import BUNDLE_FORMAT

log = logging.getLogger(__name__)

CARD = "README.md"
CARD_FORMAT = "modalign.model-card"
CARD_VERSION = 1
_ZERO = "0" * 64
_SEAL = re.compile(r"^(\s*card_sha256:\s*)'?([0-9a-f]{64})'?\s*$", re.MULTILINE)
_FRONT = re.compile(r"\A---\r?\n(.*?)\r?\n---\r?\n", re.DOTALL)

__all__ = [
    "CARD",
    "CardUpdate",
    "card_data",
    "card_is_ours",
    "metric_row",
    "read_card",
    "render_card",
    "update_card_metrics",
    "write_card",
]


# -- facts -----------------------------------------------------------------------------------
def _front_matter_license(path: Path) -> str:
    """``license`` of a Hugging Face style model dir (its README.md front matter), if any."""
    readme = path / "README.md" if path.is_dir() else path.parent / "README.md"
    try:
        front = _parse_front(readme.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, UserInputError):
        return ""
    lic = front.get("license")
    return str(lic) if isinstance(lic, str) else ""


def _package_license(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, metadata

    if not package:
        return ""
    try:
        md = metadata(package)
    except PackageNotFoundError:
        return ""
    lic = next(iter(md.get_all("License-Expression") or md.get_all("License") or []), "")
    if not lic or lic.upper() == "UNKNOWN" or "\n" in lic or len(lic) > 40:
        return ""  # a licence's full text, not an identifier
    return lic.strip().lower().replace(" ", "-")


def _ships(package: str, path: str) -> bool:
    """Whether the installed distribution ``package`` holds the weights at ``path`` (the
    packaged MiniLM does; an open_clip checkpoint of the user's is only *loaded* by
    ``open_clip_torch``, whose code licence says nothing about those weights)."""
    from importlib.metadata import PackageNotFoundError, distribution

    if not package or not path:
        return False
    try:
        dist = distribution(package)
    except PackageNotFoundError:
        return False
    target = Path(path).resolve()
    for f in dist.files or []:
        loc = Path(str(dist.locate_file(f))).resolve()
        if loc == target or target in loc.parents:
            return True
    return False


def tower_license(external: Mapping[str, Any] | None) -> str:
    """Licence of a tower's base weights: the weights' own model card (a Hugging Face style
    ``README.md`` beside them), else the licence of the package that ships the weight files;
    "" = unknown."""
    if not external:
        return ""
    path, package = str(external.get("path") or ""), str(external.get("package") or "")
    found = _front_matter_license(Path(path)) if path else ""
    return found or (_package_license(package) if _ships(package, path) else "")


def _tower(m: str, meta: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    built = (meta.get("towers") or {}).get(m) or {}
    tcfg = ((config.get("model") or {}).get("towers") or {}).get(m) or {}
    ext = (meta.get("external_weights") or {}).get(m)
    out: dict[str, Any] = {"kind": built.get("kind", ""), "arch": built.get("arch", "")}
    out["lock"] = tcfg.get("lock", "none")
    out["head"] = tcfg.get("head", "linear")
    if ext:
        package = str(ext.get("package") or "")
        out["source"] = "package" if _ships(package, str(ext.get("path") or "")) else "local"
        if package:
            out["package"] = f"{package} {ext.get('version', '')}".strip()
        out["path"] = ext.get("path", "")
        out["sha256"] = dict(ext.get("files") or {})
        out["license"] = tower_license(ext) or "unknown"
    else:
        out["source"] = "scratch"  # random initialisation: no base weights, no inherited licence
    return out


def _top_license(towers: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    based = [t.get("license", "unknown") for t in towers.values() if t["source"] != "scratch"]
    if not based or "unknown" in based:
        return {}  # no claim where a base tower's licence is not known
    if len(set(based)) == 1:
        return {"license": based[0]}
    return {"license": "other", "license_name": "several (see modalign.towers)"}


def card_data(
    meta: Mapping[str, Any],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The card's front matter for a bundle (``meta``: its ``modalign.json`` content, ``config``:
    its ``config.yaml`` as a dict)."""
    mods = list(meta.get("modalities") or [])
    towers = {m: _tower(m, meta, config) for m in mods}
    data: dict[str, Any] = {
        "library_name": "modalign",
        **_top_license(towers),
        "tags": ["modalign", "multimodal", "embeddings", "contrastive-learning", *mods],
        "pipeline_tag": "feature-extraction",
        "modalign": {
            "card_format": CARD_FORMAT,
            "card_version": CARD_VERSION,
            "card_sha256": _ZERO,
            "modalign_version": (meta.get("versions") or {}).get("modalign", __version__),
            "fingerprint": meta.get("fingerprint", ""),
            "modalities": mods,
            "embed_dim": meta.get("embed_dim"),
            "towers": towers,
            "training_data": dict(meta.get("training_data") or {}),
            "metrics": dict(metrics) if metrics else None,
            "command": meta.get("command") or "",
            "step": meta.get("step"),
        },
    }
    return data


# -- text ------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def _body(data: Mapping[str, Any]) -> str:
    ma = data["modalign"]
    mods = ", ".join(ma["modalities"])
    first = ma["modalities"][0] if ma["modalities"] else "text"
    lines = [
        f"# modalign model: {mods}",
        "",
        f"A shared {ma['embed_dim']}-dimensional embedding space for {mods}, trained with "
        f"[modalign](https://pypi.org/project/modalign/) {ma['modalign_version']} "
        f"(weights fingerprint `{ma['fingerprint']}`). Every modality's encoder maps its input "
        "to an L2-normalised vector; cosine similarity compares items across modalities.",
        "",
        "## Use",
        "",
        "```python",
        "import modalign",
        "",
        'model = modalign.load("PATH/TO/THIS/FOLDER")',
        f"vectors = model.encode({first}=[...])[{first!r}]  # L2-normalised, {ma['embed_dim']} dims",
        "```",
        "",
        "## Towers",
        "",
        "| modality | kind | arch | head | lock | base weights | licence |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, t in ma["towers"].items():
        base = {"package": t.get("package"), "local": t.get("path")}.get(
            t["source"], "none (random init)"
        )
        lic = t.get("license", "-") if t["source"] != "scratch" else "-"
        lines.append(
            f"| {m} | {t['kind']} | {t['arch'] or '-'} | {t['head']} | {t['lock']} | {base} "
            f"| {lic} |"
        )
    sha = [(m, f, h) for m, t in ma["towers"].items() for f, h in (t.get("sha256") or {}).items()]
    if sha:
        lines += ["", "Base weight files (sha256):", ""]
        lines += [f"- {m}: `{f}` `{h}`" for m, f, h in sha]
    td = ma.get("training_data") or {}
    lines += ["", "## Training data", ""]
    if td:
        for key in ("sources", "rows", "samples_seen", "bad_items", "bad_by_reason"):
            if key in td:
                value = "not counted (shards)" if td[key] is None else _fmt(td[key])
                lines.append(f"- {key.replace('_', ' ')}: {value}")
    else:
        lines.append("Not recorded.")
    lines += ["", "## Metrics", ""]
    met = ma.get("metrics")
    if met:
        lines += [
            f"From `{met.get('command', '')}` on {met.get('date', '')}"
            + (f", data `{met['data']}`" if met.get("data") else "")
            + ". 95% intervals (Wilson for proportions, percentile bootstrap otherwise).",
            "",
            "| metric | value | 95% interval | n |",
            "|---|---|---|---|",
        ]
        for r in met.get("results") or []:
            ci = (
                f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
                if r.get("ci_low") is not None
                else "-"
            )
            lines.append(f"| {r['name']} | {_fmt(r['value'])} | {ci} | {_fmt(r.get('n'))} |")
    else:
        lines.append(
            "None yet: `modalign evaluate retrieval --model THIS_FOLDER --data TEST` or "
            "`modalign benchmark SUITE --model THIS_FOLDER` fills this section."
        )
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        ma.get("command") or "(not recorded)",
        "```",
        "",
        "---",
        "This card was written by modalign. Edit it freely: the bundle's weights are verified "
        "by `modalign.json`, not by this file; once edited, modalign no longer updates it.",
        "",
    ]
    return "\n".join(lines)


def render_card(data: Mapping[str, Any]) -> str:
    """The card text for front matter ``data``, sealed (``modalign.card_sha256``)."""
    data = {**data, "modalign": {**data["modalign"], "card_sha256": _ZERO}}
    front = yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, width=1000)
    text = f"---\n{front}---\n\n{_body(data)}"
    return text.replace(_ZERO, _digest(text), 1)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _parse_front(text: str) -> dict[str, Any]:
    match = _FRONT.match(text)
    if not match:
        raise UserInputError("no YAML front matter")
    try:
        front = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise UserInputError(f"unreadable YAML front matter ({exc})") from None
    if not isinstance(front, dict):
        raise UserInputError("YAML front matter is not a mapping")
    return front


def read_card(bundle_dir: str | Path) -> dict[str, Any]:
    """The front matter of a bundle's ``README.md`` (exit 2 naming the file when unreadable)."""
    path = Path(bundle_dir) / CARD
    try:
        return _parse_front(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: cannot read the model card ({exc})") from None
    except UserInputError as exc:
        raise UserInputError(f"{path}: {exc}") from None


def card_is_ours(text: str) -> bool:
    """Whether ``text`` is a card modalign wrote and nobody changed since (its seal matches)."""
    found = _SEAL.search(text)
    if not found:
        return False
    zeroed = text[: found.start(2)] + _ZERO + text[found.end(2) :]
    return _digest(zeroed) == found.group(2)


def _may_write(path: Path) -> str:
    """ "" when ``path`` may be (re)written, else why not. A hub snapshot's file is a symlink
    into its blob cache: the atomic rename replaces the link, never the shared blob."""
    if not path.exists():
        return ""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return f"{path}: unreadable, not a card modalign wrote; left as it is"
    if not card_is_ours(text):
        return (
            f"{path}: not written by modalign or edited since (its modalign.card_sha256 seal does "
            "not match); left as it is"
        )
    return ""


def write_card(bundle_dir: str | Path, data: Mapping[str, Any]) -> str:
    """Write ``README.md`` (atomically) unless a foreign or edited one is there; returns "" when
    written, else why it was left alone (also logged as a warning)."""
    path = Path(bundle_dir) / CARD
    why = _may_write(path)
    if why:
        log.warning("model card not written: %s", why)
        return why
    atomic_write_text(path, render_card(data))
    return ""


# -- metrics updates -------------------------------------------------------------------------
@dataclass(frozen=True)
class CardUpdate:
    """Outcome of :func:`update_card_metrics`: ``written`` or the reason it was not."""

    path: Path
    written: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "written": self.written, "reason": self.reason}


def metric_row(
    name: str,
    value: float,
    ci_low: float | None = None,
    ci_high: float | None = None,
    n: int | None = None,
    method: str = "",
) -> dict[str, Any]:
    """One row of the card's metrics table."""
    return {"name": name, "value": value, "ci_low": ci_low, "ci_high": ci_high, "n": n,
            "method": method}  # fmt: skip


def _finite_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """YAML-safe rows: NaN and infinities become None (not a number to show)."""
    return [
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
        for r in rows
    ]


def update_card_metrics(
    bundle_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    source: str,
    data: str = "",
) -> CardUpdate:
    """Put ``rows`` (see :func:`metric_row`) into the metrics section of a bundle's card.

    ``source``: what produced them (``evaluate retrieval``...); the exact command line is
    recorded beside. Never fails the caller: a foreign or edited ``README.md``, a bundle folder
    another process is writing, or a read-only folder leave the card alone and return why.
    A bundle written before cards existed gets a fresh card (from its ``modalign.json`` and
    ``config.yaml``).
    """
    directory = Path(bundle_dir)
    path = directory / CARD
    metrics = {
        "source": source,
        "command": current_command(),
        "data": data,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "results": _finite_rows(rows),
    }
    try:
        with lock_dir(directory, "model bundle", BUNDLE_FORMAT):
            why = _may_write(path)
            if why:
                return CardUpdate(path, False, why)
            if path.exists():
                front = read_card(directory)
            else:
                front = card_data(_read_json(directory / "modalign.json"), _read_yaml(directory))
            front["modalign"] = {**front.get("modalign", {}), "metrics": metrics}
            atomic_write_text(path, render_card(front))
    except (DirectoryLocked, ArtifactWriteError, UserInputError, OSError) as exc:
        reason = f"{path}: model card not updated ({exc})"
        log.warning("%s", reason)
        return CardUpdate(path, False, reason)
    return CardUpdate(path, True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{path}: unreadable ({exc})") from None
    return data if isinstance(data, dict) else {}


def _read_yaml(directory: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((directory / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserInputError(f"{directory / 'config.yaml'}: unreadable ({exc})") from None
    return data if isinstance(data, dict) else {}
