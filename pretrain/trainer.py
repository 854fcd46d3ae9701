"""Contrastive pretraining loop on Accelerate: one CPU to many GPUs, resumable to the step.

Exactness contract (tested): N processes x batch B give the same loss, gradients and weights as
one process x N*B (autograd all-gather, local loss, :class:`GlobalBatchNorm`), and
``train.accum_steps=K`` gives the gradient of the K-times larger batch (GradCache) for towers
without batch statistics. A run resumed from ``checkpoints/step-N`` continues bit-for-bit like
the uninterrupted run: weights, optimizer, schedule, every RNG and the data position are restored,
and data loading never draws from the training RNG.

This module holds the entry point and the step loop. Around it: :mod:`.accelerate_setup`
(Accelerator, compile, BatchNorm conversion), :mod:`.train_state` (checkpoint save/restore),
:mod:`.accumulation` (GradCache), :mod:`.run_log` (metrics log, progress),
:mod:`.process_state` (each run as in a fresh process), :mod:`.validate` (the ``evaluate``
callback).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalign.core.artifact import (
    OutputKind,
    atomic_write_text,
    check_output_dir,
    output_dir,
    output_path,
    remove_stale_temp,
)
from modalign.core.config_io import dump_yaml
from modalign.core.errors import ConfigError
from modalign.core.invocation import current_command
from modalign.core.world import world
from modalign.data.cache import open_cache
from modalign.data.dataset import BadItemLog, Batch
from modalign.data.modality import ModalitySpec, modality_specs
from modalign.data.preflight import SourceCheck, check_source
from modalign.data.sources import open_stream
from modalign.pretrain import checkpoint as ckpt
from modalign.pretrain import run_log
from modalign.pretrain.accelerate_setup import (
    check_precision,
    compile_trunks,
    make_accelerator,
    sync_batchnorm,
)
from modalign.pretrain.accumulation import cached_accumulation_step
from modalign.pretrain.best import BEST_DIR, BestSoFar
from modalign.pretrain.bundle import FORMAT as BUNDLE_FORMAT
from modalign.pretrain.bundle import save_bundle
from modalign.pretrain.checkpoint import state as train_state
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.cpu_precision import bf16_step_route
from modalign.pretrain.distributed import all_reduce_mean
from modalign.pretrain.engines import check_shardable, full_model_state
from modalign.pretrain.feed import next_micro_batches
from modalign.pretrain.losses import ContrastiveLoss, LossOutput
from modalign.pretrain.model import ContrastiveTask, build_encoder
from modalign.pretrain.multinode import check_shared_output, run_failed
from modalign.pretrain.optim import make_optimizer, make_scheduler
from modalign.pretrain.process_state import process_state_guard
from modalign.pretrain.projection_init import fit_projection_inits
from modalign.pretrain.towers import TowerBuilder
from modalign.pretrain.towers.in_loader import FrozenTowersHook, loader_modalities
from modalign.pretrain.update import TrainingDiverged, apply_update, check_finite_weights
from modalign.pretrain.validate import EncoderView, Evaluate, run_validation

__all__ = ["PretrainResult", "TrainingDiverged", "cached_accumulation_step", "pretrain"]

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    bad_items: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0


@dataclass
class _Run:
    """Everything the step loop needs, built once by :func:`_setup`."""

    cfg: PretrainConfig
    accelerator: Any
    task: nn.Module  # possibly DDP-wrapped
    core: ContrastiveTask
    optimizer: Any
    scheduler: Any
    specs: dict[str, ModalitySpec]
    built: Any
    out_dir: Path
    start_step: int
    position: int
    last_ckpt: Path | None
    evaluate: Evaluate | None = None
    passed_specs: Mapping[str, ModalitySpec] | None = (
        None  # specs given to pretrain(), not registered
    )
    best: BestSoFar | None = None  # train.keep_best (modalign.pretrain.best)
    stopped_at: int = 0  # the step train.early_stop ended the run at (0 = ran to train.steps)
    train_rows: int | None = None  # rows of data.train (None: shards, not counted)

    @property
    def state(self) -> train_state.TrainState:
        return train_state.TrainState(self.core, self.optimizer, self.scheduler, self.accelerator)


RUN_KIND = OutputKind(
    BUNDLE_FORMAT,
    "pretraining run (model bundle + checkpoints)",
    # a checkpoint's state.json marks a run by its presence: format-1 checkpoints (still
    # resumable) wrote no ``format`` field
    (("modalign.json", BUNDLE_FORMAT), ("checkpoints/step-*/state.json", None)),
)
"""A pretraining output folder: the bundle, or checkpoints of a run not finished yet."""


def pretrain(
    cfg: PretrainConfig,
    resume: str | None = None,
    tower_builders: Mapping[str, TowerBuilder] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
    *,
    evaluate: Evaluate | None = None,
) -> PretrainResult:
    """Train the towers contrastively on ``cfg.data.train`` and write a bundle to ``cfg.output.dir``.

    ``tower_builders``/``modalities`` extend the built-in ones (e.g. to add a "depth" modality:
    a builder named by ``model.towers.depth.kind`` and a ``ModalitySpec`` named "depth").
    ``resume``: "latest" or a checkpoint dir; with "latest" and no checkpoint, starts fresh.
    ``evaluate(view, step) -> dict``: called every ``train.val_every`` steps on the main process
    with the live encoder (e.g. ``modalign.retrieval.evaluate.make_validator(cfg.data.val)``).
    The output dir is locked for the run (a second run into it fails at once, exit 2), and the
    process is left as found (threads, RNGs, autocast, Accelerate state, environment).
    Raises :class:`TrainingDiverged` (weights of the failing step not applied, checkpoints kept)
    when the loss or gradient norm stops being finite.
    """
    started = time.perf_counter()
    _check_inputs(cfg, resume)
    if cfg.train.keep_best and (evaluate is None or cfg.train.val_every <= 0):
        raise ConfigError(
            f"train.keep_best={cfg.train.keep_best!r} selects on validation: set data.val and "
            "train.val_every > 0 (or pass evaluate=)"
        )
    if evaluate is None and cfg.train.val_every > 0:
        log.warning(
            "train.val_every=%d but no evaluate callback: no validation this run (pass "
            "evaluate=modalign.retrieval.make_validator(SRC), or start the run with "
            "modalign.run_pretrain, which does so for data.val)",
            cfg.train.val_every,
        )
    with process_state_guard(), ExitStack() as held:
        # Process-wide settings for this run only: the guard puts the caller's back.
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        run = _setup(cfg, resume, tower_builders, modalities, held)
        run.evaluate = evaluate
        run.best = BestSoFar.open(cfg.train, run.out_dir, fresh=run.last_ckpt is None)
        try:
            loss_value, history, bad = _train_loop(run)
            _finish(run, loss_value, bad)
        except RuntimeError as exc:  # torch's collectives fail so when a peer is gone
            if world()[1] == 1 or isinstance(exc, torch.OutOfMemoryError):
                raise
            raise run_failed(exc, cfg.train.dist_timeout, run.out_dir) from exc
    return PretrainResult(
        run.out_dir,
        run.stopped_at or cfg.train.steps,
        loss_value,
        history,
        bad.to_dict(),
        time.perf_counter() - started,
    )


def check_pretrain_inputs(cfg: PretrainConfig) -> dict[str, SourceCheck]:
    """Every source a run reads, checked and parsed without decoding an item: ``data.train``
    always, ``data.val`` when set (validation reads it at ``train.val_every``). A missing file,
    a malformed line or a wrong-typed cell fails naming the key and the path (DataError, exit
    2): ``data.val: runs/x/test.jsonl: manifest not found``."""
    mods = list(cfg.model.modalities)
    checks = {"data.train": check_source(cfg.data.train, mods, "data.train")}
    if cfg.data.val:
        checks["data.val"] = check_source(cfg.data.val, mods, "data.val")
    return checks


def _check_inputs(cfg: PretrainConfig, resume: str | None) -> None:
    """Errors about the inputs, before any work (and before the output dir is touched)."""
    check_pretrain_inputs(cfg)
    check_precision(cfg)
    # an empty output.dir would mean the current folder; a folder of the user's is refused
    check_output_dir(output_path(cfg.output.dir, "output.dir"), RUN_KIND, "output.dir")
    resume_dir = ckpt.resolve_resume(Path(cfg.output.dir), resume) if resume else None
    if resume_dir is not None:
        train_state.check_resume_config(resume_dir, cfg)


def _build_task(cfg, tower_builders, modalities, accelerator):
    """Towers, specs and the contrastive task (same initial weights on every process)."""
    mods = list(cfg.model.modalities)
    torch.manual_seed(cfg.train.seed)  # the guard restores the caller's RNG afterwards
    built = build_encoder(cfg.model, cfg.data, tower_builders)
    specs = modality_specs(mods, cfg.data, built.input_presets, extra=modalities)
    task = ContrastiveTask(built.encoder, ContrastiveLoss(mods, cfg.loss))
    if world()[1] > 1:
        sync_batchnorm(task, accelerator.device)
    if cfg.train.compile:
        compile_trunks(task.encoder, built.compilable)
    return built, {m: specs[m] for m in mods}, task


def _setup(
    cfg: PretrainConfig,
    resume: str | None,
    tower_builders: Mapping[str, TowerBuilder] | None,
    modalities: Mapping[str, ModalitySpec] | None,
    held: ExitStack | None = None,
) -> _Run:
    """Accelerator, task, optimizer, restored state. ``held`` keeps the output-dir lock (taken
    by the main process once the launch's ranks are known, before anything is written)."""
    trackers = run_log.tracker_names(cfg)
    accelerator = make_accelerator(cfg, trackers)
    rank, _ = world()
    out_dir = Path(cfg.output.dir)
    if held is not None and accelerator.is_main_process:
        held.enter_context(output_dir(cfg.output.dir, RUN_KIND, "output.dir"))
    # Several processes (machines): output.dir must be one folder they all see (exit 2 if not).
    check_shared_output(out_dir, cfg.train.shared_fs_wait)
    built, specs, task = _build_task(cfg, tower_builders, modalities, accelerator)
    resume_dir = ckpt.resolve_resume(out_dir, resume) if resume else None
    if resume_dir is None:  # pca heads: fitted on data.train before step 0 (resume restores)
        fit_projection_inits(
            task.encoder, cfg.model.towers, cfg.data.train, specs, cfg.train.batch_size,
            accelerator.device,
        )  # fmt: skip
    optimizer = make_optimizer(task, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim)
    check_shardable(accelerator, task)
    task, optimizer = accelerator.prepare(task, optimizer)
    core: ContrastiveTask = accelerator.unwrap_model(task)
    state = train_state.TrainState(core, optimizer, scheduler, accelerator)

    start_step, position = 0, 0
    if resume_dir is not None:
        restored = train_state.load_checkpoint(resume_dir, state, cfg.train.accum_steps)
        start_step, position = restored.step, restored.position
        log.info("resumed from %s at step %d", resume_dir, start_step)
    else:
        torch.manual_seed(cfg.train.seed + 1 + rank)  # per-process dropout/augment streams
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp(out_dir)
        remove_stale_temp(out_dir / "checkpoints")
        run_log.start_live_log(out_dir, start_step if resume_dir is not None else None)
    if trackers:
        accelerator.init_trackers("modalign", config=run_log.tracker_config(cfg))
    return _Run(
        cfg, accelerator, task, core, optimizer, scheduler, specs, built, out_dir,
        start_step, position, resume_dir, passed_specs=modalities,
    )  # fmt: skip


def _open_batches(run: _Run) -> tuple[Any, Iterator[Batch], BadItemLog]:
    cfg = run.cfg
    rank, world_size = world()
    stream = open_stream(
        cfg.data.train,
        run.specs,
        cfg.train.batch_size,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        num_workers=cfg.data.num_workers,
        start=run.position,
        rank=rank,
        world_size=world_size,
        cache=open_cache(cfg.data.cache),
        prefetch_factor=cfg.data.prefetch_factor,
        batch_hook=_frozen_towers_hook(run),
    )
    bad = BadItemLog()
    bad.add_counts(stream.skipped, stream.skipped_examples)
    run.train_rows = stream.rows
    return stream, iter(stream), bad


def _frozen_towers_hook(run: _Run) -> FrozenTowersHook | None:
    """The loader hook computing frozen towers' features (``train.frozen_towers``), if any."""
    encoder, cfg = run.core.encoder, run.cfg
    mods = loader_modalities(
        cfg.train.frozen_towers, encoder, run.accelerator, cfg.data.num_workers,
        compiled=cfg.train.compile,
    )  # fmt: skip
    if not mods:
        return None
    log.info("frozen towers run in the loader: %s", ", ".join(mods))
    return FrozenTowersHook(encoder, mods)


def _train_loop(run: _Run) -> tuple[float, list[dict[str, Any]], BadItemLog]:
    accelerator = run.accelerator
    stream, batches, bad = _open_batches(run)
    metrics = run_log.MetricsWriter(
        run_log.live_metrics_path(run.out_dir), accelerator.is_main_process, accelerator.log
    )
    try:
        return _steps(run, stream, batches, bad, metrics)
    finally:  # trackers are closed on error too (wandb/mlflow runs end, TensorBoard flushes)
        run_log.close_trackers(accelerator.trackers)


def _steps(run: _Run, stream: Any, batches: Iterator[Batch], bad: BadItemLog,
           metrics: run_log.MetricsWriter) -> tuple[float, list[dict[str, Any]], BadItemLog]:  # fmt: skip
    cfg, accelerator = run.cfg, run.accelerator
    _, world_size = world()
    history: list[dict[str, Any]] = []
    bar = run_log.progress(cfg, run.start_step, accelerator.is_main_process)
    loss_value = float("nan")
    meter = _Throughput()
    run.task.train()
    for step in range(run.start_step, cfg.train.steps):
        t0 = time.perf_counter()
        micro = next_micro_batches(
            batches, run.specs, cfg.train.accum_steps, accelerator.device, bad, cfg.data.train
        )
        meter.wait += time.perf_counter() - t0
        meter.seen += sum(len(b) for b in micro) * world_size
        out = _train_step(run.task, run.core, micro, accelerator, cfg)
        loss_value = float(all_reduce_mean(out.value.detach()) * world_size)
        apply_update(run, out, loss_value, step + 1)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            record = meter.record(done, loss_value, run, out, bad)
            history.append(record)
            metrics.write(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{record['lr']:.2e}")
        bar.update(1)
        if run.evaluate is not None and cfg.train.val_every > 0 and done % cfg.train.val_every == 0:
            _validate(run, done, metrics, history)
            if run.best is not None and run.best.exhausted(done):
                run.stopped_at = done
                log.info("early stop at step %d: best %s", done, run.best.record())
                break
        if cfg.train.checkpoint_every > 0 and (
            done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps
        ):
            check_finite_weights(run, done)  # every process (weights agree): all raise together
            run.last_ckpt = train_state.save_checkpoint(
                run.state, run.out_dir, cfg, done, stream.position
            )
    bar.close()
    return loss_value, history, bad


@dataclass
class _Throughput:
    """Samples/s and the share of time spent waiting for data, between two log records."""

    t_last: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    seen: int = 0

    def record(self, step: int, loss: float, run: _Run, out: LossOutput, bad: BadItemLog) -> dict:
        now = time.perf_counter()
        elapsed = max(now - self.t_last, 1e-9)
        record = {
            "step": step,
            "loss": loss,
            "lr": run.scheduler.get_last_lr()[0],
            "samples_per_s": self.seen / elapsed,
            "data_wait": self.wait / elapsed,
            "logit_scale": out.logit_scale,
            "bad_items": bad.total,
        }
        self.t_last, self.wait, self.seen = now, 0.0, 0
        return record


def _validate(
    run: _Run, step: int, metrics: run_log.MetricsWriter, history: list[dict[str, Any]]
) -> None:
    """The ``evaluate`` callback on the main process (RNG untouched so resume stays exact)."""
    if run.accelerator.is_main_process and run.evaluate is not None:
        view = EncoderView(run.core.encoder, run.specs, run.accelerator.device)
        val = run_validation(run.evaluate, view, step)
        record = {"step": step, "val": val}
        history.append(record)
        metrics.write(record)
        log.info("validation at step %d: %s", step, val)
    if run.best is not None:
        _keep_best(run, val if run.accelerator.is_main_process else None, step)
    run.accelerator.wait_for_everyone()


def _keep_best(run: _Run, val: dict[str, Any] | None, step: int) -> None:
    """Offer a validation to ``train.keep_best``; a better one writes ``best/`` (every process
    takes part: the weights gather is a collective under sharded engines)."""
    assert run.best is not None
    value = train_state.from_main(run.best.score(val) if val is not None else None)
    if not run.best.offer(value, step):
        return
    weights = full_model_state(run.accelerator, run.task, prefix="encoder.")
    if run.accelerator.is_main_process:
        save_bundle(
            run.out_dir / BEST_DIR, run.core.encoder, run.cfg, run.built.image_preset,
            extra={"step": step, "selected": run.best.record()},
            modalities=run.passed_specs, state=weights,
        )  # fmt: skip
        log.info("best so far: %s", run.best.record())


def _train_step(
    task: nn.Module, core: ContrastiveTask, micro: list[Batch], accelerator, cfg: PretrainConfig
) -> LossOutput:
    # bf16 on a CPU with native bf16: PyTorch's own kernels, not oneDNN's (see cpu_precision)
    with bf16_step_route(accelerator.device, str(accelerator.mixed_precision)):
        if len(micro) == 1:
            with accelerator.autocast():
                out = task(micro[0])
            accelerator.backward(out.loss.loss)
            return out.loss
        return cached_accumulation_step(core, micro, accelerator)


def _provenance(run: _Run, bad: BadItemLog | None = None) -> dict[str, Any]:
    """What a bundle (and its model card) records about how it was made: the command line and
    a training data summary (sources, samples seen, bad items by reason)."""
    cfg = run.cfg
    global_batch = cfg.train.batch_size * cfg.train.accum_steps * run.accelerator.num_processes
    data: dict[str, Any] = {
        "sources": cfg.data.train,
        "rows": run.train_rows,
        "samples_seen": (run.stopped_at or cfg.train.steps) * global_batch,
    }
    if bad is not None:
        data.update(bad_items=bad.total, bad_by_reason=dict(bad.counts))
    return {"command": current_command(), "training_data": data}


def _finish(run: _Run, loss_value: float, bad: BadItemLog) -> None:
    """Bundle first; ``run_config.yaml`` and ``metrics.jsonl`` only once it is written."""
    accelerator, cfg = run.accelerator, run.cfg
    final = run.stopped_at or cfg.train.steps
    accelerator.wait_for_everyone()
    check_finite_weights(run, final)
    # Full weights on the main process (a gather on every process when they are sharded).
    weights = full_model_state(accelerator, run.task, prefix="encoder.")
    extra: dict[str, Any] = {"step": final, **_provenance(run, bad)}
    best_file = run.best.weights_path(run.out_dir) if run.best is not None else None
    if accelerator.is_main_process:
        if best_file is not None and run.best is not None:  # train.keep_best: the best weights
            from safetensors.torch import load_file

            weights, extra["selected"] = load_file(str(best_file)), run.best.record()
        save_bundle(
            run.out_dir,
            run.core.encoder,
            cfg,
            run.built.image_preset,
            extra=extra,
            modalities=run.passed_specs,
            state=weights,
        )
        atomic_write_text(run.out_dir / "run_config.yaml", dump_yaml(cfg))
        run_log.publish_metrics(run.out_dir, {"step": final, "loss": loss_value, **bad.to_dict()})
        if bad.total:
            log.warning(bad.summary())
    accelerator.wait_for_everyone()
