"""Check the pickles a sharded checkpoint holds before torch reads them.

``accelerator.save_state`` under FSDP with ``SHARDED_STATE_DICT`` writes torch Distributed
Checkpoint (DCP) folders: per-process ``__<rank>_0.distcp`` files and one ``.metadata``. torch's
reader loads ``.metadata`` with plain ``pickle.load`` and the non-tensor entries (optimizer
``param_groups``: lr, betas, ...) with ``torch.load(weights_only=False)``; tensors themselves
are read with ``weights_only=True``. :func:`check_dcp_pickles` loads those same bytes first with
a restricted unpickler (only DCP's metadata dataclasses, ``torch.Size``, dtypes, layouts and
paths) and ``torch.load(weights_only=True)``. A pickle can run code only through the globals it
names, so a file that passes can build nothing else when torch reads it; one that names any
other global is refused (exit 2) before torch opens it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from modalign.core.errors import UserInputError

__all__ = ["check_dcp_pickles", "restricted_load"]

METADATA_FILE = ".metadata"  # torch.distributed.checkpoint.filesystem._metadata_fn
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which a DCP metadata file never does"
        )


def restricted_load(path: Path) -> Any:
    """Unpickle ``path`` allowing only the globals a DCP ``.metadata`` file uses."""
    with open(path, "rb") as fh:
        return _Restricted(fh).load()


def check_dcp_pickles(root: Path) -> int:
    """Check every DCP folder under ``root`` (see module doc); returns the folders checked."""
    found = sorted(Path(root).rglob(METADATA_FILE))
    for meta_file in found:
        try:
            meta = restricted_load(meta_file)
            _check_byte_items(meta_file.parent, meta)
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
            raise UserInputError(
                f"{meta_file}: refused to read this checkpoint folder ({exc}); it was not written "
                "by modalign's save_state. Resume from another checkpoint"
            ) from None
    return len(found)


def _check_byte_items(folder: Path, meta: Any) -> None:
    """``torch.load(weights_only=True)`` of each non-tensor entry (torch reads them unrestricted)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_items = {
        fqn for fqn, m in meta.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)
    }
    for index, info in meta.storage_data.items():
        if index.fqn not in byte_items:
            continue
        if info.transform_descriptors:
            raise ValueError(f"entry {index.fqn} uses storage transforms, which cannot be checked")
        with open(folder / info.relative_path, "rb") as fh:
            fh.seek(info.offset)
            blob = fh.read(info.length)
        try:
            torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as exc:  # weights_only refusals are plain pickle/runtime errors
            raise ValueError(f"entry {index.fqn}: {exc}") from None
