"""Contrastive pretraining loop on Accelerate: one CPU to many GPUs, resumable to the step.

Exactness contract (tested): N processes x batch B give the same loss, gradients and weights as
one process x N*B (autograd all-gather, local loss, :class:`GlobalBatchNorm`), and
``train.accum_steps=K`` gives the gradient of the K-times larger batch (GradCache) for towers
without batch statistics. A run resumed from ``checkpoints/step-N`` continues bit-for-bit like
the uninterrupted run: weights, optimizer, schedule, every RNG and the data position are restored,
and data loading never draws from the training RNG.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalign.core.artifact import atomic_dir, atomic_write_text
from modalign.core.config_io import dump_yaml
from modalign.core.errors import ConfigError, DataError, ModalignError
from modalign.data.dataset import BadItemLog, Batch
from modalign.data.modality import ModalitySpec, default_modalities
from modalign.data.sources import open_stream
from modalign.pretrain import checkpoint as ckpt
from modalign.pretrain.bundle import encoder_state, save_bundle
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.distributed import all_reduce_mean, all_reduce_min, convert_batchnorm, world
from modalign.pretrain.losses import ContrastiveLoss, LossOutput
from modalign.pretrain.model import ContrastiveTask, build_encoder
from modalign.pretrain.optim import make_optimizer, make_scheduler
from modalign.pretrain.towers import TowerBuilder, default_tower_builders

log = logging.getLogger(__name__)

# Consecutive batches with no rows on some process before the data is declared unusable.
MAX_EMPTY_BATCHES = 100


class TrainingDiverged(ModalignError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


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


def _make_accelerator(cfg: PretrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    device = cfg.train.device
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if cpu and cfg.train.precision == "fp16":
        # Accelerate silently runs fp16 on CPU as fp32 (no autocast, no scaler): say so instead.
        raise ConfigError(
            "train.precision=fp16 needs a CUDA device (it uses a loss scaler); "
            "on CPU use train.precision=bf16 or fp32"
        )
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
    _release_accelerator_state(cpu, precision)
    # Rows may lack a modality for a whole batch; DDP must then tolerate unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=cpu, mixed_precision=precision, kwargs_handlers=[ddp])


def _release_accelerator_state(cpu: bool, precision: str) -> None:
    """Let a second ``pretrain()`` in one process use another precision or device.

    Accelerate keeps a process-wide singleton and refuses a new Accelerator whose settings
    differ from the first one's. The process group (``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState

    if not AcceleratorState._shared_state:
        return
    state = AcceleratorState()
    if state.mixed_precision != precision or (cpu and state.device.type != "cpu"):
        AcceleratorState._reset_state(reset_partial_state=False)


def _to_device(batch: Batch, modalities: list[str], device: torch.device) -> Batch:
    out = dict(batch)
    for m in modalities:
        if isinstance(batch.get(m), torch.Tensor):
            out[m] = batch[m].to(device, non_blocking=True)
    out["present"] = {m: p.to(device) for m, p in batch["present"].items()}
    return out


def _ensure_present(batch: Batch, modalities: list[str], spec: Mapping[str, ModalitySpec]) -> Batch:
    """Give every modality an entry (all-absent rows) so every process runs the same graph."""
    n = len(batch["id"])
    for m in modalities:
        if m not in batch:
            batch[m] = spec[m].collate([spec[m].placeholder] * n)
            batch["present"][m] = torch.zeros(n, dtype=torch.bool)
    return batch


def pretrain(
    cfg: PretrainConfig,
    resume: str | None = None,
    tower_builders: Mapping[str, TowerBuilder] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
) -> PretrainResult:
    """Train the towers contrastively on ``cfg.data.train`` and write a bundle to ``cfg.output.dir``.

    ``tower_builders``/``modalities`` extend the built-in ones (e.g. to add a "depth" modality:
    a builder named by ``model.towers.depth.kind`` and a ``ModalitySpec`` named "depth").
    ``resume``: "latest" or a checkpoint dir; with "latest" and no checkpoint, starts fresh.
    Raises :class:`TrainingDiverged` (weights of the failing step not applied, checkpoints kept)
    when the loss or gradient norm stops being finite.
    """
    started = time.perf_counter()
    if not cfg.data.train:
        raise DataError(
            "data.train is empty; set it to a manifest or shard pattern (--set data.train=PATH)"
        )
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    with _deterministic(cfg.train.deterministic):
        run = _setup(cfg, resume, tower_builders, modalities)
        loss_value, history, bad = _train_loop(run)
    _finish(run, loss_value, bad)
    return PretrainResult(
        run.out_dir,
        cfg.train.steps,
        loss_value,
        history,
        bad.to_dict(),
        time.perf_counter() - started,
    )


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic kernels for this run only (the flag is process-wide in torch)."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _setup(
    cfg: PretrainConfig,
    resume: str | None,
    tower_builders: Mapping[str, TowerBuilder] | None,
    modalities: Mapping[str, ModalitySpec] | None,
) -> _Run:
    accelerator = _make_accelerator(cfg)
    rank, world_size = world()
    out_dir = Path(cfg.output.dir)
    mods = list(cfg.model.modalities)

    torch.manual_seed(cfg.train.seed)  # same initial weights on every process
    built = build_encoder(
        cfg.model, cfg.data, {**default_tower_builders(), **(tower_builders or {})}
    )
    specs = {**default_modalities(cfg.data, built.image_preset), **(modalities or {})}
    missing = [m for m in mods if m not in specs]
    if missing:
        raise DataError(
            f"model.modalities {missing} have no registered data spec; pass modalities=..."
        )
    specs = {m: specs[m] for m in mods}
    task = ContrastiveTask(built.encoder, ContrastiveLoss(mods, cfg.loss))
    if world_size > 1:
        _sync_batchnorm(task, accelerator.device)
    if cfg.train.compile:
        _compile_trunks(task.encoder)
    optimizer = make_optimizer(task, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim)
    task, optimizer = accelerator.prepare(task, optimizer)
    core: ContrastiveTask = accelerator.unwrap_model(task)

    start_step, position = 0, 0
    resume_dir = ckpt.resolve_resume(out_dir, resume) if resume else None
    if resume_dir is not None:
        start_step, position = _load_checkpoint(
            resume_dir, core, optimizer, scheduler, accelerator, rank, cfg.train.accum_steps
        )
        log.info("resumed from %s at step %d", resume_dir, start_step)
    else:
        torch.manual_seed(cfg.train.seed + 1 + rank)  # per-process dropout/augment streams
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temp_dirs(out_dir)
        if resume_dir is not None:
            _trim_metrics(out_dir / "metrics.jsonl", start_step)
        atomic_write_text(out_dir / "run_config.yaml", dump_yaml(cfg))
    return _Run(
        cfg, accelerator, task, core, optimizer, scheduler, specs, built, out_dir,
        start_step, position, resume_dir,
    )  # fmt: skip


def _train_loop(run: _Run) -> tuple[float, list[dict[str, Any]], BadItemLog]:
    cfg, accelerator = run.cfg, run.accelerator
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
    )
    bad = BadItemLog()
    bad.add_counts(getattr(stream, "skipped", {}), getattr(stream, "skipped_examples", []))
    batches = iter(stream)
    history: list[dict[str, Any]] = []
    metrics = _MetricsWriter(run.out_dir / "metrics.jsonl", accelerator.is_main_process, cfg)
    bar = _progress(cfg, run.start_step, accelerator.is_main_process)
    loss_value = float("nan")
    t_last, wait, seen = time.perf_counter(), 0.0, 0
    run.task.train()
    for step in range(run.start_step, cfg.train.steps):
        t0 = time.perf_counter()
        micro = _next_micro_batches(batches, run, bad)
        wait += time.perf_counter() - t0
        seen += sum(len(b["id"]) for b in micro) * world_size
        out = _train_step(run.task, run.core, micro, accelerator, cfg)
        loss_value = float(all_reduce_mean(out.value.detach()) * world_size)
        _apply_update(run, out, loss_value, step + 1)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            now = time.perf_counter()
            elapsed = max(now - t_last, 1e-9)
            record = {
                "step": done,
                "loss": loss_value,
                "lr": run.scheduler.get_last_lr()[0],
                "samples_per_s": seen / elapsed,
                "data_wait": wait / elapsed,
                "logit_scale": out.logit_scale,
                "bad_items": bad.total,
            }
            history.append(record)
            metrics.write(record)
            bar.set_postfix(
                loss=f"{loss_value:.3f}",
                lr=f"{record['lr']:.2e}",
                sps=f"{record['samples_per_s']:.0f}",
                wait=f"{record['data_wait']:.0%}",
            )
            t_last, wait, seen = now, 0.0, 0
        bar.update(1)
        if cfg.train.val_every > 0 and cfg.data.val and done % cfg.train.val_every == 0:
            _validate(run, done, metrics, history)
        if cfg.train.checkpoint_every > 0 and (
            done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps
        ):
            run.last_ckpt = _save_checkpoint(run, done, stream.position)
    bar.close()
    return loss_value, history, bad


def _validate(run: _Run, step: int, metrics: _MetricsWriter, history: list[dict[str, Any]]) -> None:
    """Retrieval Recall@K on ``data.val`` (main process; RNG untouched so resume stays exact)."""
    from modalign.pretrain.validate import validation_recall

    if run.accelerator.is_main_process:
        with torch.random.fork_rng(devices=[]):
            val = validation_recall(
                run.core.encoder, run.cfg.data.val, run.specs, run.accelerator.device
            )
        record = {"step": step, "val": val}
        history.append(record)
        metrics.write(record)
        summary = ", ".join(f"{pair} R@1 {m['recall@1']:.3f}" for pair, m in sorted(val.items()))
        log.info("validation at step %d: %s", step, summary)
    run.accelerator.wait_for_everyone()


def _next_micro_batches(batches: Iterator[Batch], run: _Run, bad: BadItemLog) -> list[Batch]:
    """The next ``accum_steps`` micro-batches, on the device, every modality filled in.

    Data loading runs outside the training RNG (DataLoader iterators draw a seed from the global
    torch generator), so a resumed run sees the same dropout masks as an uninterrupted one.
    Batches that leave some process without rows (every item bad) are skipped on all processes.
    """
    mods = list(run.specs)
    for _ in range(MAX_EMPTY_BATCHES):
        with torch.random.fork_rng(devices=[]):
            micro = [next(batches) for _ in range(run.cfg.train.accum_steps)]
        for b in micro:
            bad.add(b["bad"])
        rows = min(len(b["id"]) for b in micro)
        if all_reduce_min(rows, run.accelerator.device) > 0:
            return [
                _to_device(_ensure_present(b, mods, run.specs), mods, run.accelerator.device)
                for b in micro
            ]
        log.warning("skipping a batch with no usable rows on some process")
    raise DataError(
        f"{run.cfg.data.train}: {MAX_EMPTY_BATCHES} batches in a row had no usable rows; "
        f"check the data ({bad.summary()})"
    )


def _apply_update(run: _Run, out: LossOutput, loss_value: float, step: int) -> None:
    """Clip, check for divergence, then step optimizer and schedule (nothing applied on NaN)."""
    if not math.isfinite(loss_value):
        _diverged(run, f"loss became {loss_value}", step, out)
    norm = _clip_and_norm(run)
    # With fp16 the loss scaler owns overflow: it skips that step and lowers the scale.
    if run.accelerator.scaler is None and norm is not None and not math.isfinite(norm):
        _diverged(run, f"gradient norm became {norm}", step, out)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.core.loss.clamp_()


def _clip_and_norm(run: _Run) -> float | None:
    """Clip to ``optim.grad_clip`` (0 = off) and return the global gradient norm."""
    params = [p for p in run.core.parameters() if p.requires_grad]
    if run.cfg.optim.grad_clip > 0:
        # Accelerate unscales fp16 gradients before clipping; gradients are already synced.
        norm = run.accelerator.clip_grad_norm_(params, run.cfg.optim.grad_clip)
        return None if norm is None else float(norm)
    if run.accelerator.scaler is not None:
        return None
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _diverged(run: _Run, what: str, step: int, out: LossOutput) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    pairs = ", ".join(f"{k}={v:.4g}" for k, v in out.per_pair.items()) or "none"
    raise TrainingDiverged(
        f"{what} at step {step} (per-pair losses: {pairs}); the update was not applied and no "
        f"checkpoint was written for this step. Last good checkpoint: "
        f"{run.last_ckpt or 'none (no checkpoint yet)'}. Lower optim.lr, raise "
        "optim.warmup_steps, use train.precision=fp32, or check the data; then resume with "
        "--resume latest"
    )


def _finish(run: _Run, loss_value: float, bad: BadItemLog) -> None:
    accelerator, cfg = run.accelerator, run.cfg
    accelerator.wait_for_everyone()
    _check_finite_weights(run, cfg.train.steps)
    if accelerator.is_main_process:
        save_bundle(
            run.out_dir,
            run.core.encoder,
            cfg,
            run.built.image_preset,
            extra={"step": cfg.train.steps, "external": run.built.external},
        )
        _MetricsWriter(run.out_dir / "metrics.jsonl", True, cfg, tensorboard=False).write(
            {"event": "end", "step": cfg.train.steps, "loss": loss_value, **bad.to_dict()}
        )
        if bad.total:
            log.warning(bad.summary())
    accelerator.wait_for_everyone()


def _check_finite_weights(run: _Run, step: int) -> None:
    """Never write non-finite weights over a good checkpoint or bundle."""
    bad = [n for n, p in run.core.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(
            f"weights became non-finite by step {step} ({', '.join(bad[:3])}...); nothing was "
            f"saved for this step. Last good checkpoint: {run.last_ckpt or 'none'}. Lower optim.lr"
        )


def _compile_trunks(encoder: nn.Module) -> None:
    """torch.compile each tensor-input trunk in place (``Module.compile`` keeps state-dict keys,
    so checkpoints and bundles stay interchangeable with uncompiled runs)."""
    for trunk in encoder.trunks.values():
        if hasattr(trunk, "st"):  # sentence-transformers trunk takes strings: leave it eager
            continue
        trunk.compile()


def _sync_batchnorm(task: nn.Module, device: torch.device) -> None:
    """Global batch statistics across processes, so N x B equals 1 x N*B."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        task.encoder = convert_sync_batchnorm(task.encoder)
    else:
        convert_batchnorm(task.encoder)


def _train_step(
    task: nn.Module, core: ContrastiveTask, micro: list[Batch], accelerator, cfg: PretrainConfig
) -> LossOutput:
    if len(micro) == 1:
        with accelerator.autocast():
            out = task(micro[0])
        accelerator.backward(out.loss.loss)
        return out.loss
    return cached_accumulation_step(core, micro, accelerator)


def cached_accumulation_step(
    core: ContrastiveTask, micro: list[Batch], accelerator: Any
) -> LossOutput:
    """Exact large-batch gradient over K micro-batches (GradCache, Gao et al. 2021).

    1) embed every micro-batch without grad, remembering the RNG state so dropout and
    augmentation replay identically; 2) loss on all features at once -> d loss / d features;
    3) re-embed each micro-batch with grad and backpropagate those feature gradients.
    Memory stays at one micro-batch of activations. Equal to the big batch for towers without
    batch statistics; BatchNorm normalises per micro-batch (as in GradCache/open_clip), and its
    running statistics are updated once per micro-batch, not twice.
    """
    mods = core.encoder.modalities
    states, feats = [], []
    with torch.no_grad(), _frozen_batchnorm_stats(core):
        for b in micro:
            states.append(_rng_snapshot())
            with accelerator.autocast():
                feats.append(core(b, features_only=True))
    cached = {m: torch.cat([f[m] for f in feats]).detach().requires_grad_(True) for m in mods}
    present = {m: torch.cat([b["present"][m] for b in micro]) for m in mods}
    with accelerator.autocast():
        loss = core.loss(cached, present)
    accelerator.backward(loss.loss)
    offset = 0
    for b, state in zip(micro, states):
        n = len(b["id"])
        _rng_restore(state)
        with accelerator.autocast():
            f = core(b, features_only=True)
        used = [m for m in mods if cached[m].grad is not None]  # pairs with no rows: no grad
        if used:
            surrogate = sum(
                (f[m] * cached[m].grad[offset : offset + n].to(f[m].dtype)).sum() for m in used
            )
            surrogate.backward()
        offset += n
    _average_gradients(core)
    return loss


@contextmanager
def _frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Restore BatchNorm running statistics afterwards (the no-grad pass must not count)."""
    saved = [
        (m, {k: v.clone() for k, v in m.named_buffers(recurse=False)})
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


def _rng_snapshot() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    )


def _rng_restore(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _average_gradients(model: nn.Module) -> None:
    """DDP hooks are bypassed in the cached path; average gradients across processes by hand.

    Which parameters have gradients is the same on every process (a pair is skipped only when
    no process has rows for it), so every process issues the same all-reduces.
    """
    _, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= size


def _save_checkpoint(run: _Run, step: int, position: int) -> Path:
    from safetensors.torch import save_file

    accelerator, core, cfg = run.accelerator, run.core, run.cfg
    final = run.out_dir / "checkpoints" / f"step-{step}"
    _rank, world_size = world()
    # Every rank's RNG state is needed to replay augmentation; gather them to the main process.
    rng_all = _gather_objects(ckpt.rng_state())
    _check_finite_weights(run, step)  # on every process (weights agree), so all raise together
    if accelerator.is_main_process:
        with atomic_dir(final) as tmp:
            state = {f"encoder.{k}": v for k, v in encoder_state(core.encoder, cfg).items()}
            state.update(
                {
                    f"loss.{k}": v.detach().cpu().contiguous()
                    for k, v in core.loss.state_dict().items()
                }
            )
            save_file(state, str(tmp / "model.safetensors"))
            torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            for r, state_r in enumerate(rng_all):
                torch.save(state_r, tmp / f"rng-{r}.pt")
            # Written last: a checkpoint without its state file is never listed as complete.
            (tmp / ckpt.STATE_FILE).write_text(
                json.dumps(
                    {
                        "step": step,
                        "micro_batches": position,
                        "world_size": world_size,
                        "config": dump_yaml(cfg),
                    }
                )
            )
        ckpt.prune_checkpoints(run.out_dir, cfg.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def _gather_objects(obj: Any) -> list[Any]:
    _rank, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def _load_checkpoint(
    path: Path,
    core: ContrastiveTask,
    optimizer,
    scheduler,
    accelerator,
    rank: int,
    accum_steps: int,
) -> tuple[int, int]:
    """Restore a checkpoint; returns (step, data position in micro-batches)."""
    from safetensors.torch import load_file

    state = ckpt.read_state(path)
    weights = load_file(str(path / "model.safetensors"))
    enc = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    loss = {k.removeprefix("loss."): v for k, v in weights.items() if k.startswith("loss.")}
    core.encoder.load_state_dict(enc, strict=False)
    core.loss.load_state_dict(loss)
    optimizer.load_state_dict(ckpt.torch_load(path / "optimizer.pt"))
    scheduler.load_state_dict(ckpt.torch_load(path / "scheduler.pt"))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(ckpt.torch_load(path / "scaler.pt"))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():
        ckpt.set_rng_state(ckpt.torch_load(rng_file))
    else:
        log.warning("%s has no RNG state for rank %d (world size changed); reseeding", path, rank)
    step = int(state["step"])
    return step, int(state.get("micro_batches", step * accum_steps))


def _trim_metrics(path: Path, step: int) -> None:
    """Drop records past the resumed step: the steps after it are trained again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        if record.get("step", 0) <= step and "event" not in record:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


class _MetricsWriter:
    def __init__(
        self, path: Path, enabled: bool, cfg: PretrainConfig, tensorboard: bool | None = None
    ) -> None:
        self.path, self.enabled = path, enabled
        self.tb = None
        if enabled and (cfg.train.tensorboard if tensorboard is None else tensorboard):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record and "loss" in record:
            self.tb.add_scalar("train/loss", record["loss"], record["step"])


def _progress(cfg: PretrainConfig, start: int, main: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.train.steps,
        initial=start,
        desc="pretrain",
        disable=not (cfg.train.progress and main),
        dynamic_ncols=True,
    )
