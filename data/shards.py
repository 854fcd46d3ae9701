"""WebDataset shards as an iterable of the same :class:`Sample` s :class:`PairedDataset` yields.

A shard is a tar file whose members ``KEY.EXT`` are grouped by ``KEY`` into one sample:
each modality's :attr:`ModalitySpec.extensions` (built-ins: ``jpg/png/webp/...`` -> image,
``wav/flac/mp3/...`` -> audio, ``txt`` -> text), ``cls`` -> label, ``json`` -> a dict that may
carry ``label``, ``id``, inline modalities and other fields (``Sample.meta``). Shards written by
``data pack`` and img2dataset-style shards (``jpg``/``txt``/``json``) read the same way. Shards are read with the ``webdataset`` library (local paths and
``pipe:`` URLs, brace patterns such as ``dir/train-{000000..000009}.tar``).

Order: the shard list is permuted by (seed, epoch), split across processes (``rank::world``) and
then across DataLoader workers; each worker shuffles samples in a buffer seeded by (seed, epoch,
rank, worker). Augmentation randomness is seeded by (seed, epoch, shard, key), so it does not
depend on how work is split.

Damage is never fatal: a shard that ends mid-member (truncated download) or cannot be opened
loses its tail; the partial sample is dropped and the problem travels as one bad record, so
counts reach the run's :class:`BadItemLog` like any other bad item.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modalign.core.errors import DataError
from modalign.data.batch import BadRecord, Sample
from modalign.data.cache import ItemCache
from modalign.data.columns import id_cell, label_cell
from modalign.data.dataset import RawSource
from modalign.data.decode import BadItem, decode_text
from modalign.data.modality import ModalitySpec
from modalign.data.sample import decode_sample

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BAD_KEY = "__bad__"  # a record that only carries shard-level problems


def is_shard_pattern(src: str | Path) -> bool:
    """True for a WebDataset shard, pattern or ``pipe:`` URL (tar, tar.gz, tgz)."""
    text = str(src).strip()
    if text.startswith("pipe:"):
        return True
    last = text.split("::")[-1].lower().rstrip("}")
    return last.endswith(SHARD_SUFFIXES)


def expand_shards(pattern: str | Path) -> list[str]:
    """Brace-expand a shard pattern (``a-{000..009}.tar``, ``::`` joins several) into URLs.

    Raises :class:`DataError` naming the pattern when it expands to nothing or a local shard is
    missing (a source-level problem the user must fix, unlike a damaged shard).
    """
    from braceexpand import braceexpand

    text = str(pattern).strip()
    urls = [u for part in text.split("::") if part for u in braceexpand(part)]
    if not urls:
        raise DataError(f"{text}: shard pattern expands to no shard")
    missing = [u for u in urls if _is_local(u) and not Path(_local_path(u)).is_file()]
    if missing:
        raise DataError(
            f"{text}: {len(missing)} of {len(urls)} shards not found (first: {missing[0]}); "
            "check the path and the {first..last} range"
        )
    return urls


def _is_local(url: str) -> bool:
    return (not url.startswith("pipe:") and "://" not in url) or url.startswith("file://")


def _local_path(url: str) -> str:
    return url.removeprefix("file://")


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one shard, in tar order.

    A truncated or unreadable shard ends early: the sample being grouped when the cut came is
    dropped (its members may be incomplete) and one record ``{BAD_KEY: [(reason, detail), ...]}``
    closes the shard.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    problems: list[tuple[str, str]] = []
    truncated: list[BaseException] = []

    def handler(exn: BaseException) -> bool:
        # A read error in a streamed tar means the rest is gone: stop and drop the partial sample.
        if isinstance(exn, tarfile.ReadError | EOFError | OSError):
            truncated.append(exn)
            return False
        problems.append(("corrupt_member", f"{url}: {exn}"))
        return True

    current: dict[str, Any] | None = None
    stream = None
    try:
        stream = gopen(_local_path(url) if url.startswith("file://") else url)
        for member in tar_file_iterator(stream, handler=handler):
            key, ext = base_plus_ext(member["fname"])
            if key is None or not ext:
                problems.append(("no_extension", f"{url}: member {member['fname']!r}"))
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = member["data"]
    except Exception as exn:  # header cut off, pipe failed, not a tar at all
        truncated.append(exn)
    finally:
        _close_quietly(stream)
    if truncated:
        lost = f" (sample {current['__key__']!r} dropped)" if current is not None else ""
        problems.append(("truncated_shard", f"{url}: {_short(truncated[0])}{lost}"))
    elif current is not None:
        yield current
    if problems:
        yield {"__key__": url, "__url__": url, BAD_KEY: problems}


def _short(exn: BaseException) -> str:
    text = str(exn.args[0]) if exn.args else type(exn).__name__
    return f"{type(exn).__name__}: {text.split(' @ ')[0][:200]}"


def _close_quietly(stream: Any) -> None:
    # A pipe we stop reading early exits non-zero on close; the shard's problem is already counted.
    if stream is None:
        return
    with contextlib.suppress(Exception):
        stream.close()


def count_shard(url: str) -> int:
    """Records :func:`iter_shard` yields for ``url`` (reads the shard, decodes nothing)."""
    return sum(1 for _ in iter_shard(url))


def stable_hash(*parts: object) -> int:
    """A 63-bit hash of ``parts`` that is the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (memory: ``size`` raw samples)."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class ShardDataset(RawSource):
    """Iterable over WebDataset shards, split by process and DataLoader worker.

    ``rank``/``world_size`` default to torch.distributed's when it is initialised. Each process
    reads the shards ``perm[rank::world]`` of the epoch's shard permutation, each worker a slice
    of those. Use :class:`~modalign.data.stream.SourceStream` for endless, resumable training
    batches, or a plain DataLoader (``batch_size``, ``collate_fn=Collate(...)``) for one pass.
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str],
        modalities: Mapping[str, ModalitySpec],
        train: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        cache: ItemCache | None = None,
    ) -> None:
        if isinstance(urls, str | Path):
            source, shard_urls = str(urls), expand_shards(urls)
        else:
            shard_urls = list(urls)
            source = shard_urls[0] if len(shard_urls) == 1 else f"{len(shard_urls)} shards"
        super().__init__(modalities, train, seed, shuffle, rank, world_size, source, cache)
        self.urls = shard_urls
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self._counts: dict[str, int] = recorded_counts(self.urls)  # no pass over the shards
        self._by_ext = _extension_map(self.modalities)
        if len(self.urls) < self.world:
            raise DataError(
                f"{self.source}: {len(self.urls)} shards cannot feed {self.world} processes; "
                "re-pack with a smaller --shard-size so there is at least one shard per process"
            )

    def rank_shards(self) -> list[str]:
        """This process's shards for the current epoch."""
        if self.shuffle:
            order = random.Random(stable_hash(self.seed, self.epoch, "shards")).sample(
                range(len(self.urls)), len(self.urls)
            )
        else:
            order = list(range(len(self.urls)))
        return [self.urls[i] for i in order[self.rank :: self.world]]

    def worker_shards(self, worker: int, num_workers: int) -> list[str]:
        return self.rank_shards()[worker::num_workers]

    def raw(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        records: Iterator[dict[str, Any]] = (
            rec for url in self.worker_shards(worker, num_workers) for rec in iter_shard(url)
        )
        if self.shuffle_buffer > 1:
            seed = stable_hash(self.seed, self.epoch, self.rank, worker, num_workers, "buffer")
            records = buffer_shuffle(records, self.shuffle_buffer, random.Random(seed))
        return records

    def counts(self, num_workers: int) -> list[int]:
        """Records per worker this epoch; counts each shard once (reads it) and caches it."""
        out = []
        for w in range(num_workers):
            urls = self.worker_shards(w, num_workers)
            for url in urls:
                if url not in self._counts:
                    self._counts[url] = count_shard(url)
            out.append(sum(self._counts[u] for u in urls))
        return out

    def decode(self, raw: dict[str, Any], position: int) -> Sample:
        return decode_shard_sample(
            raw, self.modalities, self._by_ext, self.train, self.seed, self.epoch, position,
            cache=self.cache,
        )  # fmt: skip


def _extension_map(modalities: Mapping[str, ModalitySpec]) -> dict[str, str]:
    by_ext: dict[str, str] = {}
    for name, spec in modalities.items():
        for ext in spec.extensions:
            by_ext.setdefault(ext.lower(), name)
    return by_ext


META_EXTENSIONS = ("cls", "json", "id")


def decode_shard_sample(
    raw: dict[str, Any],
    modalities: Mapping[str, ModalitySpec],
    by_ext: Mapping[str, str],
    train: bool,
    seed: int,
    epoch: int,
    position: int,
    cache: ItemCache | None = None,
) -> Sample:
    """Raw shard record -> :class:`Sample` (via the shared :func:`decode_sample`).

    Members map to modalities by extension (``by_ext``); ``cls`` or the json's ``label`` is the
    label, the json's ``id`` the id (else the key), its other fields go to ``Sample.meta`` and
    may carry inline modalities (img2dataset's ``caption``... only under the modality's name).
    """
    key, url = raw["__key__"], raw["__url__"]
    if BAD_KEY in raw:
        bad = [BadRecord(url, "shard", r, d) for r, d in raw[BAD_KEY]]
        return Sample(id=key, label=None, index=position, bad=bad)
    where = f"{url}#{key}"
    problems: list[BadRecord] = []
    meta = _read_meta(raw, where, problems)
    values = _modality_values(raw, meta, modalities, by_ext)
    sample = decode_sample(
        values,
        modalities,
        train,
        np.random.default_rng([seed, epoch, stable_hash(url, key)]),
        id=_id(meta, key, where, problems),
        label=_label(raw, meta, where, problems),
        index=position,
        where=where,
        meta={k: v for k, v in meta.items() if k not in ("id", "label")},
        cache=cache,
    )
    sample.bad[:0] = problems
    if not values:
        exts = sorted(k for k in raw if not k.startswith("__"))
        unknown = [e for e in exts if e not in by_ext and e not in META_EXTENSIONS]
        reason = "unknown_extension" if unknown else "no_modality"
        sample.bad.append(BadRecord(where, "-", reason, f"members: {', '.join(exts) or 'none'}"))
    return sample


def _read_meta(raw: dict[str, Any], where: str, bad: list[BadRecord]) -> dict[str, Any]:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        bad.append(BadRecord(where, "json", "corrupt_json", str(exc)[:200]))
        return {}
    return meta if isinstance(meta, dict) else {}


def _id(meta: Mapping[str, Any], key: str, where: str, bad: list[BadRecord]) -> str:
    """The json's ``id`` under the manifest ``id`` rule (else the key); a wrong type is counted."""
    try:
        return id_cell(meta.get("id"), where, key)
    except DataError as exc:
        bad.append(BadRecord(where, "json", "bad_id", str(exc)[:200]))
        return key


def _label(
    raw: dict[str, Any], meta: Mapping[str, Any], where: str, bad: list[BadRecord]
) -> str | None:
    """``cls``, else the json's ``label`` under the manifest ``label`` rule (wrong type: counted,
    unlabeled)."""
    if "cls" in raw:
        try:
            return decode_text(raw["cls"])
        except BadItem:
            return None
    try:
        return label_cell(meta.get("label"), where)
    except DataError as exc:
        bad.append(BadRecord(where, "json", "bad_label", str(exc)[:200]))
        return None


def _modality_values(
    raw: dict[str, Any],
    meta: Mapping[str, Any],
    modalities: Mapping[str, ModalitySpec],
    by_ext: Mapping[str, str],
) -> dict[str, tuple[str, Any]]:
    """Modality -> (member extension, bytes); inline modalities may also come from the json."""
    values: dict[str, tuple[str, Any]] = {}
    for ext, value in raw.items():
        name = by_ext.get(ext) or by_ext.get(ext.rsplit(".", 1)[-1])
        if name is not None and name not in values:
            values[name] = (ext, value)
    for name, spec in modalities.items():
        if spec.inline and name not in values and meta.get(name) is not None:
            values[name] = ("json", meta[name])
    return values


# -- recorded counts -------------------------------------------------------------------------
# Sample counts of shards without reading them: ``data pack``'s index, img2dataset's stats.
#
# A resume (and every epoch's per-worker plan) needs each shard's record count. Reading every
# tar to count it costs a pass over the corpus; the writers already recorded the counts:
#
# * ``modalign data pack`` writes ``DIR/index.json`` (``format: modalign.shards``) with
#   ``pattern`` and per-shard ``counts`` in the pattern's order;
# * img2dataset writes ``DIR/NNNNN_stats.json`` beside ``DIR/NNNNN.tar`` with ``successes``.
#
# A count is trusted only for a local shard that is not newer than the file that recorded it
# (a shard rewritten since is counted by reading it, as before).

PACK_INDEX = "index.json"
PACK_FORMAT = "modalign.shards"


def recorded_counts(urls: Sequence[str]) -> dict[str, int]:
    """``{url: records}`` for every local shard in ``urls`` whose count a writer recorded."""
    local = {u: Path(u[5:] if u.startswith("file:") else u) for u in urls if "://" not in u}
    packed: dict[str, tuple[int, Path]] = {}
    for folder in {p.parent for p in local.values()}:
        packed.update(_pack_counts(folder))
    out: dict[str, int] = {}
    for url, path in local.items():
        found = packed.get(str(path)) or _img2dataset_count(path)
        if found is not None and path.is_file():
            n, recorder = found
            if path.stat().st_mtime_ns <= recorder.stat().st_mtime_ns:
                out[url] = n
    return out


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pack_counts(folder: Path) -> dict[str, tuple[int, Path]]:
    """``{shard path: (count, index.json)}`` from a ``data pack`` index in ``folder``."""
    index = folder / PACK_INDEX
    meta = _read(index)
    if not meta or meta.get("format") != PACK_FORMAT or not isinstance(meta.get("counts"), list):
        return {}
    try:
        names = expand_shards(str(meta["pattern"]))
    except Exception:
        return {}
    if len(names) != len(meta["counts"]):
        return {}
    return {str(folder / Path(nm).name): (int(n), index) for nm, n in zip(names, meta["counts"])}


def folder_shards(folder: Path) -> list[str]:
    """The shards of a shard folder, checked against what its writer recorded (sorted paths).

    A ``data pack`` folder lists its shards and their counts in ``index.json``: a listed shard
    that is gone, or a tar the index does not list, is a :class:`DataError` naming it (reading
    the rest would silently lose or add items). In an img2dataset folder, a ``NNNNN_stats.json``
    recording successes whose ``NNNNN.tar`` is gone is the same error. Without either record,
    the tars present are the source.
    """
    from braceexpand import braceexpand

    folder = Path(folder)
    present = sorted(p for p in folder.iterdir() if p.name.lower().endswith(SHARD_SUFFIXES))
    index = folder / PACK_INDEX
    meta = _read(index)
    if meta and meta.get("format") == PACK_FORMAT and isinstance(meta.get("counts"), list):
        listed = [folder / Path(u).name for u in braceexpand(str(meta.get("pattern", "")))]
        counts = [int(n) for n in meta["counts"]]
        if len(listed) != len(counts):
            raise DataError(
                f"{index}: lists {len(listed)} shards but {len(counts)} counts; the file was "
                "edited: re-pack the folder with `modalign data pack`"
            )
        missing = [(p, n) for p, n in zip(listed, counts) if not p.is_file()]
        if missing:
            lost = sum(n for _, n in missing)
            raise DataError(
                f"{folder}: shard {missing[0][0].name} is missing ({len(missing)} of "
                f"{len(listed)} shards listed in {index.name}, {lost} of {sum(counts)} items); "
                "restore it or re-pack the folder with `modalign data pack`"
            )
        extra = [p for p in present if p not in set(listed)]
        if extra:
            raise DataError(
                f"{folder}: shard {extra[0].name} is not listed in {index.name} (written by "
                "something else, or left from another pack); move it away or re-pack the folder"
            )
        return [str(p) for p in listed]
    for stats_file in sorted(folder.glob("*_stats.json")):
        stats = _read(stats_file)
        stem = stats_file.name[: -len("_stats.json")]
        has_tar = any(p.name.split(".")[0] == stem for p in present)
        if stats and isinstance(stats.get("successes"), int) and stats["successes"] and not has_tar:
            raise DataError(
                f"{folder}: shard {stem}.tar is missing but {stats_file.name} records "
                f"{stats['successes']} samples in it; restore it (or remove its stats file to "
                "accept the loss)"
            )
    return [str(p) for p in present]


def _img2dataset_count(path: Path) -> tuple[int, Path] | None:
    stats_file = path.with_name(path.name.split(".")[0] + "_stats.json")
    stats = _read(stats_file)
    if not stats or not isinstance(stats.get("successes"), int):
        return None
    return int(stats["successes"]), stats_file
