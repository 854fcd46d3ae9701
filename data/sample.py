"""The one sample decoder: raw modality values of a row -> :class:`~modalign.data.batch.Sample`.

Manifests (:class:`~modalign.data.dataset.PairedDataset`) and shards
(:class:`~modalign.data.shards.ShardDataset`) only differ in how they find a row's raw values;
both hand them here, so decoding, bad-item records and seeding are the same for every source.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from modalign.data.batch import BadRecord, Sample
from modalign.data.cache import ItemCache, load_value
from modalign.data.decode import BadItem
from modalign.data.item_keys import item_key
from modalign.data.modality import ModalitySpec


def decode_sample(
    raw: Mapping[str, tuple[str, Any]],
    specs: Mapping[str, ModalitySpec],
    train: bool,
    rng: np.random.Generator,
    *,
    id: str,
    label: str | None,
    index: int,
    where: str,
    meta: Mapping[str, Any] | None = None,
    cache: ItemCache | None = None,
) -> Sample:
    """Decode ``raw[m] = (origin, value)`` with ``specs[m].load``; a BadItem drops that modality.

    ``origin`` says where the value came from for bad-item details (a file path, a shard member
    extension, or ``""`` for an inline value); ``where`` names the row (``file:line`` or
    ``shard#key``). Modalities without a spec are ignored. The sample's augmentation ``key``
    comes from a child of ``rng`` (:func:`~modalign.data.item_keys.item_key`). With ``cache``,
    specs that split their load decode through it (:func:`~modalign.data.cache.load_value`:
    same values, fewer decodes); ``sample.counts`` says what decoding cost.
    """
    sample = Sample(id=id, label=label, index=index, meta=dict(meta or {}), key=item_key(rng))
    for name, spec in specs.items():
        if name not in raw:
            continue
        origin, value = raw[name]
        try:
            sample.values[name] = load_value(spec, value, train, rng, cache, sample.counts)
        except BadItem as exc:
            sample.bad.append(BadRecord(where, name, exc.reason, _detail(origin, exc.detail)))
    return sample


def _detail(origin: str, detail: str) -> str:
    if not origin:
        return detail
    if not detail or detail == origin:
        return origin
    return f"{origin}: {detail}"
