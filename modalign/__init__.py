"""modalign: self- and semi-supervised multimodal representation learning.

Public API (each function is what one CLI command does; ``import modalign`` imports no torch)::

    import modalign

    cfg = modalign.load_config("demo", ["data.train=my/train.jsonl", "output.dir=runs/mine"])
    modalign.run_pretrain(cfg)                          # modalign pretrain
    model = modalign.load("runs/mine")                  # a model bundle directory
    emb = model.encode(text=["the digit seven"])        # {"text": (1, D) tensor}
    modalign.build_index("runs/index", model="runs/mine", data="my/corpus.jsonl")
    hits = modalign.search("runs/index", {"text": "the digit seven"}, k=5)[0]
    clf = modalign.load_classifier("runs/mine/classifier")

``run_pretrain`` / ``run_finetune`` / ``run_benchmark`` / ``run_tune`` carry the ``run_``
prefix because ``modalign.pretrain``, ``modalign.finetune``, ``modalign.benchmark`` and
``modalign.tune`` are the packages themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modalign.core.errors import UserInputError
from modalign.core.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from modalign.config import Config
    from modalign.data.modality import ModalitySpec
    from modalign.finetune import Classifier, FinetuneResult
    from modalign.pretrain import BundleModel, EmbeddingModel, PretrainResult, TowerBuilder
    from modalign.retrieval import CorpusIndex, Embeddings, Hit, IndexBuildOptions
    from modalign.server.settings import ServeSettings
    from modalign.tune.study import TuneResult

log = logging.getLogger("modalign")

__all__ = [
    "__version__",
    "add_to_index",
    "build_index",
    "embed",
    "load",
    "load_classifier",
    "load_config",
    "run_benchmark",
    "run_finetune",
    "run_pretrain",
    "run_tune",
    "search",
    "serve",
]


def load(
    path: str | Path,
    device: str = "auto",
    tower_builders: Mapping[str, TowerBuilder] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
    runtime: str = "torch",
) -> EmbeddingModel:
    """Load a model bundle (no code is executed: safetensors + JSON + YAML).

    ``runtime="onnx"``: ``path`` is an ONNX export (``modalign export --format onnx``); the
    same ``encode`` API runs each tower's forward in ONNX Runtime (the CPU provider; CUDA with
    the ``gpu`` extra and ``device="cuda"``), decoding and preparing values as the bundle does.

    ``device``: ``"auto"`` (a GPU when one is visible, else the CPU), ``"cpu"``, ``"cuda"``,
    ``"cuda:N"``. ``model.encode(image=[...], text=[...], batch_size=64,
    convert_to_numpy=False, normalize=True, show_progress_bar=False)`` embeds any iterable of
    inputs, decoding batch by batch.

    Plugin towers and modalities are found through the registries (entry-point groups
    ``modalign.towers`` / ``modalign.modalities``); a bundle whose plugin is not installed is
    refused naming the package. ``tower_builders``/``modalities`` are optional extras for
    unregistered ones (the same ones passed to ``run_pretrain``).
    """
    from modalign.pretrain import load_model

    return load_model(path, device, tower_builders, modalities, runtime)


def load_config(name_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The root config: defaults <- YAML (a file, or a built-in name: ``demo``, ``avmnist``...)
    <- ``key=value`` overrides (``--set``), validated into typed dataclasses.

    An unknown key or a wrong type is refused (ConfigError, exit 2) naming the key and the
    valid choices, before any work.
    """
    from modalign.config import load_config as read

    return read(None if name_or_path is None else str(name_or_path), tuple(overrides))


def load_classifier(path: str | Path, device: str = "cpu") -> Classifier:
    """Load a classifier bundle (``modalign finetune``'s output; safetensors + JSON + YAML).

    ``clf.predict(SRC, drop=[...])`` labels a corpus; ``clf.evaluate(SRC, drop=[...])`` scores
    it (accuracy, macro-F1, per-subset accuracy) with the listed modalities missing.
    """
    from modalign.finetune import load_classifier as read

    return read(path, device=device)


def run_pretrain(
    cfg: Config,
    resume: str | None = None,
    *,
    evaluate: Any = None,
    tower_builders: Mapping[str, TowerBuilder] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
) -> PretrainResult:
    """Contrastive pretraining -> a model bundle in ``cfg.output.dir`` (``modalign pretrain``).

    Every input path (``data.train``, ``data.val``) is checked first (exit 2 naming the key),
    before the towers are built or ``output.dir`` is made. ``resume``: ``"latest"`` or a
    checkpoint folder. With ``train.val_every > 0`` and ``data.val`` set, validation scores
    ``data.val`` with the ``evaluate retrieval`` metrics unless ``evaluate`` (a callback, see
    :func:`modalign.pretrain.pretrain`) is given. ``tower_builders``/``modalities``: extras for
    unregistered plugins.
    """
    from modalign.pretrain import pretrain

    if evaluate is None and cfg.train.val_every > 0 and cfg.data.val:
        from modalign.retrieval import make_validator

        evaluate = make_validator(cfg.data.val)
    return pretrain(
        cfg,
        resume=resume,
        evaluate=evaluate,
        tower_builders=tower_builders,
        modalities=modalities,
    )


def run_finetune(cfg: Config, out: str | Path | None = None) -> FinetuneResult:
    """Few labels + pseudo-labels -> a classifier bundle (``modalign finetune``).

    Reads ``cfg.finetune``; the bundle goes to ``out``, else ``finetune.out``, else
    ``<output.dir>/classifier``. The model bundle and every manifest are checked before any
    work (exit 2 naming the key). ``result.out_dir`` is where it went.
    """
    from modalign.core.artifact import output_path
    from modalign.finetune import run_finetune as finetune

    if out is not None:
        target, key = Path(out), "out"
    elif cfg.finetune.out:
        target, key = Path(cfg.finetune.out), "finetune.out"
    else:  # an empty output.dir would put the classifier under the current folder
        target, key = output_path(cfg.output.dir, "output.dir") / "classifier", "output.dir"
    return finetune(cfg.finetune, target, key=key)


def embed(
    model: str | Path | BundleModel,
    data: str | Path,
    out: str | Path,
    *,
    shard_rows: int = 10_000,
    batch_size: int = 64,
    device: str = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Embed a corpus into resumable embedding shards in ``out`` (``modalign embed``).

    ``data``: a manifest or WebDataset shard pattern. Finished shards are kept, so a re-run
    continues. Under ``accelerate launch``/torchrun each process writes its block of shards
    (``rank``/``world_size`` default to ``RANK``/``WORLD_SIZE``; ``device="cuda"`` becomes
    ``cuda:LOCAL_RANK``). ``out`` is claimed (checked, locked) by rank 0 before the model is
    loaded. Returns the shard writer's summary (rows per modality, shards, bad items).
    """
    from contextlib import AbstractContextManager, nullcontext

    from modalign.core.artifact import output_dir
    from modalign.core.world import launch_world
    from modalign.retrieval import write_embedding_shards
    from modalign.retrieval.embed_shards import EMBEDDINGS_KIND, rank_device

    launched = launch_world()
    rank = launched.rank if rank is None else rank
    world_size = launched.world_size if world_size is None else world_size
    device = rank_device(device, launched.local_rank)
    claim: AbstractContextManager[Any] = (
        output_dir(out, EMBEDDINGS_KIND, "--out") if rank == 0 else nullcontext()
    )
    with claim:
        bundle = _bundle(model, device)
        return write_embedding_shards(
            bundle,
            data,
            out,
            shard_rows=shard_rows,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
        )


def build_index(
    out: str | Path,
    *,
    model: str | Path | BundleModel | None = None,
    data: str | Path | None = None,
    embeddings: str | Path | None = None,
    options: IndexBuildOptions | None = None,
    batch_size: int = 64,
    shards: int | None = None,
) -> dict[str, Any]:
    """A FAISS corpus index in ``out`` (``modalign index build``).

    From a corpus (``model`` + ``data``: embedded here; a manifest's ids must be unique, checked
    first) or from embedding shards (``embeddings``, ``embed``'s output: read shard by shard,
    memory bounded by the index). ``options``: index type, metric, memory budget, target recall,
    device (:class:`~modalign.retrieval.IndexBuildOptions`; default ``auto``). ``out`` is claimed
    before anything is embedded. Returns ``{"out", "fingerprint", "modalities": {m: stats}}``.

    ``shards`` (with ``embeddings`` only): train the IVF quantizer once, add the vectors in that
    many parallel processes and merge them into one on-disk index (``--shards N``; equal
    results to the unsharded build, see :mod:`modalign.retrieval.index.sharded`).
    """
    from modalign.core.artifact import output_dir
    from modalign.retrieval import IndexBuildOptions, build_corpus_index
    from modalign.retrieval.index.corpus import INDEX_KIND
    from modalign.retrieval.index.from_shards import build_corpus_index_from_shards

    options = options or IndexBuildOptions()
    if shards is not None and not embeddings:
        raise UserInputError(
            "--shards builds from embedding shards on disk: give --embeddings DIR (made by "
            "`modalign embed`) instead of --model/--data"
        )
    with output_dir(out, INDEX_KIND, "--out"):
        if embeddings:
            stats, fingerprint = build_corpus_index_from_shards(
                embeddings, out, options, shards=shards
            )
        else:
            emb, fingerprint, model_path = _index_embeddings(
                model, data, None, batch_size, options.device
            )
            stats = build_corpus_index(emb, out, fingerprint, model_path, options)
    return {"out": str(out), "fingerprint": fingerprint, "modalities": stats}


def add_to_index(
    index: str | Path,
    *,
    model: str | Path | BundleModel | None = None,
    data: str | Path | None = None,
    embeddings: str | Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """Append a corpus (``model`` + ``data``) or embedding shards to an index without
    rebuilding it (``modalign index add``). The index is locked from before it is read until
    the grown one is in place. Returns ``{"index", "added": {m: n}, "total": {m: n}}``."""
    from modalign.core.artifact import output_dir
    from modalign.retrieval import CorpusIndex
    from modalign.retrieval.index.corpus import INDEX_KIND

    with output_dir(index, INDEX_KIND, "--index"):
        opened = CorpusIndex.open(index)  # a broken index: refused before any embedding
        opened.check_growable()  # so is a sharded one
        emb, fingerprint, _ = _index_embeddings(model, data, embeddings, batch_size, device)
        added = opened.add(emb, fingerprint)
        opened.save(index, key="--index")
    total = {m: len(ix) for m, ix in opened.indexes.items()}
    return {"index": str(index), "added": added, "total": total}


def search(
    index: str | Path | CorpusIndex,
    queries: Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    k: int = 5,
    targets: Sequence[str] | None = None,
    model: str | Path | BundleModel | None = None,
    device: str = "cpu",
    mmap: bool = False,
) -> list[list[Hit]]:
    """Ranked hits for each query (``modalign search``): one list per query, best first.

    ``queries``: ``{"text": "a red car"}`` or ``[("image", "q.png"), ("text", "...")]``; a
    text value is inline, other modalities take a file path. ``index``: a folder (opened, with
    ``mmap`` mapping it read-only) or an open :class:`~modalign.retrieval.CorpusIndex`;
    ``model``: the bundle the index records unless given (a folder or a loaded model).
    ``targets``: modalities searched (default: every indexed one but the query's own). Every
    query is checked and encoded before any is searched (bad input: UserInputError, exit 2).
    """
    from modalign.retrieval import CorpusIndex

    pairs = list(queries.items() if isinstance(queries, Mapping) else queries)
    if not pairs:
        raise UserInputError("give at least one query, e.g. {'text': 'a red car'}")
    opened = index if isinstance(index, CorpusIndex) else CorpusIndex.open(index, mmap=mmap)
    model_path = model or opened.meta.get("model")
    if not model_path:
        raise UserInputError(f"{opened.root} does not record its model; pass model=DIR (--model)")
    bundle = _bundle(model_path, device)
    opened.require_model(bundle.fingerprint)
    vectors = [_encode_query(bundle, m, v) for m, v in pairs]
    answers = []
    for (modality, _), vec in zip(pairs, vectors):
        asked = list(targets or [])
        asked = asked or [m for m in opened.modalities if m != modality] or opened.modalities
        answers.append(opened.search(vec, k=k, targets=asked)[0])
    return answers


def serve(
    index: str | Path,
    model: str | Path | None = None,
    *,
    settings: ServeSettings | None = None,
    device: str = "cpu",
    mmap: bool = False,
    torch_threads: int = 1,
    runtime: str = "torch",
) -> None:
    """Serve cross-modal search over HTTP until interrupted (``modalign serve``).

    Loads the index and its model (the one the index records unless ``model``) once;
    ``runtime="onnx"``: ``model`` is an ONNX export of it, run in ONNX Runtime.
    ``torch_threads``: the encoders' intra-op threads, with either runtime (PyTorch's, or
    ONNX Runtime's sessions'). Without
    ``settings``: ``127.0.0.1:8000``, no token, default limits; a non-loopback host without a
    token is refused (exit 2) before the model loads.
    """
    from modalign.server.app import serve as run_server
    from modalign.server.searcher import Searcher
    from modalign.server.settings import ServeSettings, check_bind

    settings = settings or ServeSettings()
    check_bind(settings)  # bad settings fail before the model loads
    threads = max(1, torch_threads)  # one setting for both runtimes
    searcher = Searcher.open(
        index, model, device=device, mmap=mmap, runtime=runtime, threads=threads
    )
    log.info(
        "serving %s (%s) on http://%s:%d/%s",
        index,
        ", ".join(searcher.target_modalities),
        settings.host,
        settings.port,
        "" if settings.token is None else "  (token required)",
    )
    run_server(searcher, settings, torch_threads=torch_threads)


def run_benchmark(
    suite: str | Path,
    models: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    device: str = "cpu",
) -> dict[str, Any]:
    """Every task of a benchmark suite on every model bundle (``modalign benchmark``).

    ``suite``: a suite YAML or built-in name (``demo``, ``avmnist``, ``cifar10``) with
    ``key=value`` overrides. Writes ``report.json``/``report.md``/``plots/`` into ``out``
    (default ``runs/benchmark/<suite>``) and returns the report (``report["out"]`` included).
    """
    from modalign.benchmark.run import run_benchmark as run
    from modalign.benchmark.suite import load_suite

    if not models:
        raise UserInputError(
            "a benchmark needs at least one model bundle: modalign benchmark SUITE --model BUNDLE"
        )
    loaded = load_suite(str(suite), tuple(overrides))
    target = Path(out or f"runs/benchmark/{loaded.name}")
    report = run(loaded, models, target, device=device)
    report["out"] = str(target)
    return report


def run_tune(
    config: str | Path,
    budget: str | int,
    study: str | Path | None = None,
    *,
    stage: str = "finetune",
    overrides: Sequence[str] = (),
    sampler: str = "tpe",
    pruner: str = "median",
    seed: int = 0,
    val_per_class: int = 5,
    metric: str | None = None,
    label_splits: int = 1,
) -> TuneResult:
    """Optuna search over fine-tuning or pretraining settings (``modalign tune``).

    ``budget``: trials (``20``) or wall time (``"90s"``, ``"30m"``, ``"2h"``). The study folder
    (default ``runs/tune/<config>-<stage>``) holds its SQLite storage, so a re-run resumes;
    it gets ``best.yaml``, ``trials.csv``/``.md`` and plots. ``metric`` (finetune stage):
    ``subsets`` (default) or ``accuracy``; ``label_splits`` (finetune stage): each trial is
    scored on this many seeded splits of the training labels, averaged.
    """
    from modalign.tune.budget import parse_budget
    from modalign.tune.study import run_tune as run

    folder = Path(study or f"runs/tune/{Path(config).stem}-{stage}")
    return run(
        str(config),
        parse_budget(str(budget)),
        folder,
        stage=stage,
        overrides=tuple(overrides),
        sampler=sampler,
        pruner=pruner,
        seed=seed,
        val_per_class=val_per_class,
        metric=metric,
        label_splits=label_splits,
    )


# -- shared by the functions above ---------------------------------------------------------------


def _bundle(model: str | Path | BundleModel, device: str) -> BundleModel:
    """A loaded bundle as given, or the one at a path."""
    from modalign.pretrain import BundleModel, load_bundle

    return model if isinstance(model, BundleModel) else load_bundle(model, device=device)


def _index_embeddings(
    model: str | Path | BundleModel | None,
    data: str | Path | None,
    embeddings: str | Path | None,
    batch_size: int,
    device: str,
) -> tuple[dict[str, Embeddings], str, str]:
    """(embeddings, model fingerprint, model path) for an index: read from shards, or the
    corpus embedded by the model (a manifest's ids must be unique: named with their lines)."""
    from modalign.data.manifest import is_manifest
    from modalign.data.modality import MODALITIES
    from modalign.data.preflight import check_source
    from modalign.retrieval import embed_source, read_embedding_shards

    if embeddings:
        emb, meta = read_embedding_shards(embeddings)
        return emb, meta["fingerprint"], meta.get("model", "")
    if model is None or data is None:
        raise UserInputError("give --model DIR and --data SRC, or --embeddings DIR")
    if is_manifest(data):
        check_source(data, MODALITIES.names(), "--data", unique_ids=True)
    bundle = _bundle(model, device)
    emb, bad = embed_source(bundle, data, batch_size=batch_size)
    if bad.total:
        log.warning(bad.summary())
    return emb, bundle.fingerprint, str(bundle.path.resolve())


def _encode_query(model: BundleModel, modality: str, value: Any) -> Any:
    """One query's ``(1, dim)`` vector by the model's ``encode`` (bad input: UserInputError)."""
    from modalign.data.decode import BadItem

    specs = model.modality_specs()
    if modality not in specs:
        raise UserInputError(
            f"query {modality}=...: this model has no {modality!r} modality; it has "
            f"{', '.join(model.modalities)}"
        )
    if specs[modality].inline:
        if not str(value).strip():
            raise UserInputError(f"query {modality}=: the query is empty")
    elif not Path(value).is_file():
        raise UserInputError(f"query {modality}={value}: file not found")
    values: dict[str, Any] = {modality: [value]}
    try:
        return model.encode(convert_to_numpy=True, **values)[modality]
    except BadItem as exc:
        raise UserInputError(f"query {modality}={value}: cannot be read ({exc})") from None
