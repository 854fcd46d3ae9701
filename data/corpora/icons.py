"""``modalign data icons``: an instance-level image + text (+ speech) corpus from ``@tabler/icons``.

Source: the npm package ``@tabler/icons`` (MIT), given as its folder (``npm install
@tabler/icons`` -> ``node_modules/@tabler/icons``; or an extracted ``npm pack`` tarball) or as
the ``.tgz`` itself (``npm pack @tabler/icons``). Its ``icons.json`` maps every icon name to a
``category`` and a list of ``tags``; ``icons/outline/NAME.svg`` is the line drawing.

Each kept icon becomes one row: ``id`` (the icon name), ``image`` (the outline SVG rendered to
a greyscale PNG, black strokes on white, by CairoSVG), ``text`` (a caption made of the name's
words and up to :data:`MAX_TAGS` of its tags), optionally ``audio`` (the name's words spoken
by eSpeak NG with a seeded voice, speed and pitch, as the demo corpus does), ``label`` (the
category) and ``family`` (see below).

Rules (recorded in ``corpus.json``):

* **Kept categories**: an icon without a category is dropped; so is every icon of a category
  with fewer than ``min_category_items`` icons (default 20: 34 of the 41 categories of
  ``@tabler/icons`` 3.54, 5,419 of its 5,525 icons).
* **Split by item**, seeded, per category: ``test_fraction`` of each category's items go to
  ``test.jsonl``. Items are moved in *families* (the name without trailing ``-off`` and
  ``-N`` suffixes: ``bell``, ``bell-off`` and ``bell-2`` are one family), so a test item never
  has a near-duplicate variant among the training items. Every category has items on both
  sides (a category made of one family stays in train).
* **Validation** (optional, ``val_fraction`` > 0): ``val.jsonl`` is carved out of the training
  families by the same rule (for model selection on validation recall); the test split is the
  same with or without it.

Icons are instance-level data: retrieval on this corpus is judged per item (a hit is the same
icon), with ``level: instance``; the category is the label of the few-label task.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalign.core.artifact import OutputKind, atomic_write_json, check_output_dir
from modalign.core.errors import DataError, UserInputError
from modalign.data.corpora.files import CORPUS_KIND, commit_manifests, corpus_folder

__all__ = ["CORPUS_META", "IconPackage", "build_icons", "caption", "family_of", "read_package"]

CORPUS_META = "corpus.json"
CORPUS_FORMAT = "modalign.icons_corpus"
MANIFESTS = ("train.jsonl", "val.jsonl", "test.jsonl")
WHAT = "icons corpus"
MAX_TAGS = 6
STYLE = "outline"
GET_PACKAGE = (
    "get it from the npm registry with `npm pack @tabler/icons` (writes tabler-icons-VERSION.tgz; "
    "pass that file) or `npm install @tabler/icons` (pass node_modules/@tabler/icons)"
)
CAPTIONS = (
    "{name}: {tags}",
    "an icon of {name}, {tags}",
    "a line drawing of {name} ({tags})",
    "{name} icon: {tags}",
    "the {name} symbol, {tags}",
)
_SUFFIX = re.compile(r"(-off|-\d+)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass
class IconPackage:
    """What the builder reads from the package: metadata, the icon table and the SVG sources."""

    name: str
    version: str
    license: str
    icons: dict[str, dict[str, Any]]  # icons.json
    svgs: dict[str, bytes]  # icon name -> outline SVG


def family_of(name: str) -> str:
    """``bell-off`` / ``bell-2`` / ``bell-2-off`` -> ``bell``: the unit the split moves."""
    base = name
    while (stripped := _SUFFIX.sub("", base)) != base and stripped:
        base = stripped
    return base


def caption(name: str, tags: list[str], template: str) -> str:
    """The name's words and up to :data:`MAX_TAGS` tags that add a word the name lacks."""
    words = name.replace("-", " ")
    seen = set(words.split())
    extra: list[str] = []
    for tag in tags:
        tag = str(tag).strip().replace("-", " ")
        if tag and not set(tag.split()) <= seen and tag not in extra:
            extra.append(tag)
        if len(extra) == MAX_TAGS:
            break
    if not extra:
        return f"the {words} icon"
    return template.format(name=words, tags=", ".join(extra))


def _package_root(path: Path) -> Path:
    for root in (path, path / "package"):
        if (root / "icons.json").is_file():
            return root
    raise UserInputError(f"{path}: no icons.json here or in {path / 'package'}; {GET_PACKAGE}")


def read_package(path: str | Path) -> IconPackage:
    """The package folder (or its ``npm pack`` tarball) -> :class:`IconPackage`.

    Raises:
        UserInputError: the path is missing or is not an ``@tabler/icons``-style package
            (no ``icons.json``, a malformed entry, an icon without its outline SVG), naming the
            file and entry and how to get the package.
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: icon package not found; {GET_PACKAGE}")
    if path.is_file():
        files = _read_tarball(path)
    else:
        root = _package_root(path)
        svg_dir = root / "icons" / STYLE
        files = {
            "icons.json": (root / "icons.json").read_bytes(),
            "package.json": (root / "package.json").read_bytes()
            if (root / "package.json").is_file()
            else b"",
        }
        if svg_dir.is_dir():
            files.update({f"icons/{STYLE}/{p.name}": p.read_bytes() for p in svg_dir.glob("*.svg")})
    return _parse(path, files)


def _read_tarball(path: Path) -> dict[str, bytes]:
    """One pass over the tarball (gzip tar reads are sequential): the files the builder needs."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                rel = member.name.split("/", 1)[1] if "/" in member.name else member.name
                if rel in ("icons.json", "package.json") or (
                    rel.startswith(f"icons/{STYLE}/") and rel.endswith(".svg")
                ):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        files[rel] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserInputError(f"{path}: not a readable npm tarball ({exc}); {GET_PACKAGE}") from None
    if "icons.json" not in files:
        raise UserInputError(f"{path}: the tarball holds no package/icons.json; {GET_PACKAGE}")
    return files


def _parse(path: Path, files: Mapping[str, bytes]) -> IconPackage:
    where = f"{path}: icons.json"
    try:
        icons = json.loads(files["icons.json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{where} is not valid JSON ({exc}); {GET_PACKAGE}") from None
    if not isinstance(icons, dict) or not icons:
        raise UserInputError(f"{where} is not an object of icons by name; {GET_PACKAGE}")
    for name, entry in icons.items():
        if not isinstance(entry, dict) or not _NAME.match(str(name)):
            raise UserInputError(
                f"{where}: entry {name!r} must be an object keyed by a lower-case icon name"
            )
        if not isinstance(entry.get("tags", []), list):
            raise UserInputError(f"{where}: entry {name!r} has tags that are not a list")
        if not isinstance(entry.get("category", ""), str):
            raise UserInputError(f"{where}: entry {name!r} has a category that is not a string")
    meta: dict[str, Any] = {}
    if files.get("package.json"):
        try:
            meta = json.loads(files["package.json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserInputError(f"{path}: package.json is not valid JSON ({exc})") from None
    svgs = {
        rel.rsplit("/", 1)[1][: -len(".svg")]: data
        for rel, data in files.items()
        if rel.startswith(f"icons/{STYLE}/")
    }
    return IconPackage(
        name=str(meta.get("name", "")),
        version=str(meta.get("version", "")),
        license=str(meta.get("license", "")),
        icons=icons,
        svgs=svgs,
    )


def _select(
    pkg: IconPackage, min_category_items: int
) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Names kept (sorted), kept category sizes, dropped category sizes ('' = no category)."""
    sizes = Counter(str(e.get("category", "")).strip() for e in pkg.icons.values())
    kept = {c: n for c, n in sizes.items() if c and n >= min_category_items}
    dropped = {c: n for c, n in sizes.items() if c not in kept}
    names = sorted(n for n, e in pkg.icons.items() if str(e.get("category", "")).strip() in kept)
    missing = [n for n in names if n not in pkg.svgs]
    if missing:
        raise UserInputError(
            f"icons.json lists {len(missing)} icon(s) without icons/{STYLE}/NAME.svg "
            f"(first: {missing[0]!r}); the package is incomplete, {GET_PACKAGE}"
        )
    return names, dict(sorted(kept.items())), dict(sorted(dropped.items()))


def _split(
    names: list[str], category: Mapping[str, str], test_fraction: float, rng: np.random.Generator
) -> set[str]:
    """Test names: per category (of a family's first member), whole families, seeded; a family
    that would leave its category without any other item is never taken."""
    families: dict[str, list[str]] = defaultdict(list)
    for n in names:
        families[family_of(n)].append(n)
    by_category: dict[str, list[str]] = defaultdict(list)
    for fam, members in sorted(families.items()):
        by_category[category[members[0]]].append(fam)
    test: set[str] = set()
    for cat in sorted(by_category):
        fams = by_category[cat]
        total = sum(len(families[f]) for f in fams)
        want = max(1, round(test_fraction * total))
        taken = 0
        for i in rng.permutation(len(fams)).tolist():
            if taken >= want:
                break
            if taken + len(families[fams[i]]) >= total:
                continue  # keep the category on the other side too
            test.update(families[fams[i]])
            taken += len(families[fams[i]])
    return test


def _render(svg: bytes, size: int, name: str) -> bytes:
    """An SVG -> greyscale PNG bytes, ``size`` pixels square, drawn on white."""
    try:
        import cairosvg
    except (ImportError, OSError) as exc:  # OSError: cairocffi finds no libcairo
        raise UserInputError(
            f"rendering the icons needs CairoSVG and the cairo library ({exc}): "
            "pip install 'modalign[icons]' (and on Debian/Ubuntu: apt-get install libcairo2)"
        ) from None
    from PIL import Image

    try:
        png = cairosvg.svg2png(
            bytestring=svg, output_width=size, output_height=size, background_color="white"
        )
    except Exception as exc:
        raise UserInputError(f"icons/{STYLE}/{name}.svg: cannot be rendered ({exc})") from None
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _check_args(size: int, min_items: int, test_fraction: float, val_fraction: float) -> None:
    if size < 8:
        raise UserInputError(f"--size must be >= 8 pixels, got {size}")
    if not 0.0 < test_fraction < 1.0:
        raise UserInputError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0 - test_fraction:
        raise UserInputError(
            f"--val-fraction must be >= 0 and leave training items beside --test-fraction "
            f"{test_fraction}, got {val_fraction}"
        )
    if min_items < 2:
        raise UserInputError(f"--min-category-items must be >= 2, got {min_items}")


def build_icons(
    package: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    size: int = 128,
    min_category_items: int = 20,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    audio: bool = True,
    sample_rate: int = 16000,
    workers: int = 2,
    limit: int | None = None,
) -> dict[str, Any]:
    """Write ``images/*.png`` (+ ``audio/*.wav``), ``train.jsonl``, ``test.jsonl`` (+
    ``val.jsonl``) and ``corpus.json`` (package name, version and licence, the rules, the
    counts) into ``out``.

    Written under the :mod:`modalign.data.corpora.files` protocol (locked; old manifests and
    metadata removed first; new ones written atomically last). ``limit`` keeps the first
    ``limit`` icons by name before the category rule (for smoke runs). Returns the metadata
    plus ``out``, ``train``, ``test`` and ``wall_s``.
    """
    _check_args(size, min_category_items, test_fraction, val_fraction)
    started = time.perf_counter()
    root = Path(out)
    marker = ((CORPUS_META, CORPUS_FORMAT),)
    # a folder holding other files is refused before the package is read (and again under lock)
    check_output_dir(root, OutputKind(CORPUS_KIND.format, WHAT, marker), "--out")
    pkg = read_package(package)
    if limit is not None:
        pkg.icons = dict(sorted(pkg.icons.items())[: max(0, limit)])
    names, kept, dropped = _select(pkg, min_category_items)
    if not names:
        raise DataError(
            f"{package}: no category has >= {min_category_items} icons; lower --min-category-items"
        )
    if audio:  # fail before any work when speech synthesis is unavailable
        from modalign.data.corpora.espeak import import_loader

        try:
            import_loader()
        except RuntimeError as exc:
            raise UserInputError(f"{exc}; or build without speech: --no-audio") from None
    category = {n: str(pkg.icons[n]["category"]).strip() for n in names}
    # one stream each for the test split, the validation split and the items' captions/voices:
    # adding a validation split changes neither the test split nor any item
    test = _split(names, category, test_fraction, np.random.default_rng([seed, 0]))
    val: set[str] = set()
    if val_fraction > 0:  # carved out of the training families, by the same rule
        rest = [n for n in names if n not in test]
        val_rng = np.random.default_rng([seed, 1])
        val = _split(rest, category, val_fraction / (1.0 - test_fraction), val_rng)
    with corpus_folder(root, [*MANIFESTS, CORPUS_META], WHAT, markers=marker):
        split = {
            n: "test.jsonl" if n in test else "val.jsonl" if n in val else "train.jsonl"
            for n in names
        }
        rng = np.random.default_rng([seed, 2])
        rows, jobs = _plan(root, pkg, names, category, split, rng, audio, size)
        if not val:
            del rows["val.jsonl"]
        if jobs:
            from modalign.data.corpora.demo import synthesize_words

            synthesize_words(jobs, sample_rate, workers)
        commit_manifests(root, rows)
        meta = {
            "format": CORPUS_FORMAT,
            "format_version": 1,
            "package": {"name": pkg.name, "version": pkg.version, "license": pkg.license},
            "style": STYLE,
            "image_size": size,
            "audio": audio,
            "seed": seed,
            "rules": {
                "min_category_items": min_category_items,
                "test_fraction": test_fraction,
                "val_fraction": val_fraction,
                "split": "by item family (name without trailing -off / -N), per category",
                "retrieval_level": "instance",
            },
            "items": {s.removesuffix(".jsonl"): len(r) for s, r in rows.items()},
            "categories": kept,
            "dropped_categories": dropped,
        }
        atomic_write_json(root / CORPUS_META, meta)
    return {
        "out": str(root),
        "train": str(root / "train.jsonl"),
        **({"val": str(root / "val.jsonl")} if val else {}),
        "test": str(root / "test.jsonl"),
        **{k: meta[k] for k in ("package", "items", "categories", "dropped_categories")},
        "wall_s": round(time.perf_counter() - started, 2),
    }


def _plan(
    root: Path,
    pkg: IconPackage,
    names: list[str],
    category: Mapping[str, str],
    split: Mapping[str, str],
    rng: np.random.Generator,
    audio: bool,
    size: int,
) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[str, str, str, int, int, float]]]:
    """Render every image; draw each item's caption template (and voice, speed, pitch, gain)."""
    voices: list[str] = []
    if audio:
        from modalign.data.corpora.speech import available_voices

        voices = available_voices()
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in MANIFESTS}
    jobs = []
    for name in names:
        entry = pkg.icons[name]
        image = f"images/{name}.png"
        (root / image).write_bytes(_render(pkg.svgs[name], size, name))  # durable at commit
        template = CAPTIONS[int(rng.integers(len(CAPTIONS)))]
        row: dict[str, Any] = {
            "id": name,
            "image": image,
            "text": caption(name, list(entry.get("tags", [])), template),
        }
        if audio:
            voice = voices[int(rng.integers(len(voices)))]
            rate, pitch = int(rng.integers(120, 230)), int(rng.integers(20, 80))
            level = float(rng.uniform(0.3, 0.9))
            spoken = name.replace("-", " ")
            jobs.append((str(root / "audio" / f"{name}.wav"), spoken, voice, rate, pitch, level))
            row["audio"] = f"audio/{name}.wav"
        row["label"] = category[name]
        row["family"] = family_of(name)
        rows[split[name]].append(row)
    return rows, jobs
