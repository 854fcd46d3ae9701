"""Contrastive pretraining loop on Accelerate: one CPU to many GPUs, resumable to the step."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalign.data.config_io import dump_yaml
from modalign.data.dataset import BadItemLog, Batch, PairedDataset
from modalign.data.errors import DataError, ModalignError
from modalign.data.manifest import read_manifest
from modalign.data.modality import ModalitySpec, default_modalities
from modalign.data.stream import BatchStream
from modalign.pretrain import checkpoint as ckpt
from modalign.pretrain.bundle import encoder_state, save_bundle
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.distributed import all_reduce_mean, convert_batchnorm, world
from modalign.pretrain.losses import ContrastiveLoss, LossOutput
from modalign.pretrain.model import ContrastiveTask, build_encoder
from modalign.pretrain.optim import make_optimizer, make_scheduler
from modalign.pretrain.towers import TowerBuilder

log = logging.getLogger(__name__)


class TrainingDiverged(ModalignError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class PretrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    bad_items: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0


def _make_accelerator(cfg: PretrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    device = cfg.train.device
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
    # Rows may lack a modality for a whole batch; DDP must then tolerate unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=cpu, mixed_precision=precision, kwargs_handlers=[ddp])


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

    ``tower_builders``/``modalities`` extend the built-in ones (e.g. to add a "depth" modality).
    ``resume``: "latest" or a checkpoint dir; with "latest" and no checkpoint, starts fresh.
    """
    started = time.perf_counter()
    if not cfg.data.train:
        raise DataError(
            "data.train is empty; set it to a manifest or shard pattern (--set data.train=PATH)"
        )
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = _make_accelerator(cfg)
    rank, world_size = world()
    out_dir = Path(cfg.output.dir)
    mods = list(cfg.model.modalities)

    torch.manual_seed(cfg.train.seed)  # same initial weights on every process
    builders = {**(tower_builders or {})}
    built = build_encoder(cfg.model, cfg.data, {**_default_builders(), **builders})
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

    manifest = read_manifest(cfg.data.train, mods, inline=[m for m, s in specs.items() if s.inline])
    dataset = PairedDataset.from_manifest(manifest, specs, train=True, seed=cfg.train.seed)
    optimizer = make_optimizer(task, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim)
    task, optimizer = accelerator.prepare(task, optimizer)
    core: ContrastiveTask = accelerator.unwrap_model(task)

    start_step = 0
    resume_dir = ckpt.resolve_resume(out_dir, resume) if resume else None
    if resume_dir is not None:
        start_step = _load_checkpoint(resume_dir, core, optimizer, scheduler, accelerator, rank)
        log.info("resumed from %s at step %d", resume_dir, start_step)
    else:
        torch.manual_seed(cfg.train.seed + 1 + rank)  # per-process dropout/augment streams

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out_dir / "run_config.yaml", dump_yaml(cfg))
    bad = BadItemLog()
    bad.add_counts(manifest.skipped, manifest.skipped_examples)
    stream = BatchStream(
        dataset,
        cfg.train.batch_size,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        num_workers=cfg.data.num_workers,
        start=start_step * cfg.train.accum_steps,
    )
    batches = iter(stream)
    history: list[dict[str, Any]] = []
    metrics = _MetricsWriter(out_dir / "metrics.jsonl", accelerator.is_main_process, cfg)
    bar = _progress(cfg, start_step, accelerator.is_main_process)
    last_ckpt = resume_dir
    loss_value = float("nan")
    t_last, wait, seen = time.perf_counter(), 0.0, 0
    task.train()
    for step in range(start_step, cfg.train.steps):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.accum_steps)]
        wait += time.perf_counter() - t0
        for b in micro:
            bad.add(b["bad"])
        micro = [
            _to_device(_ensure_present(b, mods, specs), mods, accelerator.device) for b in micro
        ]
        seen += sum(len(b["id"]) for b in micro) * world_size
        out = _train_step(task, core, micro, accelerator, cfg)
        loss_value = float(all_reduce_mean(out.value.detach()) * world_size)
        if not torch.isfinite(torch.tensor(loss_value)):
            raise TrainingDiverged(
                f"loss became {loss_value} at step {step + 1}; weights were not updated. "
                f"Last good checkpoint: {last_ckpt or 'none'}. Lower optim.lr, use train.precision=fp32, "
                "or check the data; resume with --resume latest"
            )
        if cfg.optim.grad_clip > 0:
            accelerator.clip_grad_norm_(core.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            now = time.perf_counter()
            record = {
                "step": done,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": seen / max(now - t_last, 1e-9),
                "data_wait": wait / max(now - t_last, 1e-9),
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
        if cfg.train.checkpoint_every > 0 and (
            done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps
        ):
            last_ckpt = _save_checkpoint(
                out_dir, done, core, optimizer, scheduler, accelerator, cfg, stream.position
            )
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_bundle(
            out_dir,
            core.encoder,
            cfg,
            built.image_preset,
            extra={"step": cfg.train.steps, "external": built.external},
        )
        metrics.write(
            {"event": "end", "step": cfg.train.steps, "loss": loss_value, **bad.to_dict()}
        )
        if bad.total:
            log.warning(bad.summary())
    accelerator.wait_for_everyone()
    return PretrainResult(
        out_dir, cfg.train.steps, loss_value, history, bad.to_dict(), time.perf_counter() - started
    )


def _default_builders() -> dict[str, TowerBuilder]:
    from modalign.pretrain.towers import default_tower_builders

    return default_tower_builders()


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
    return _cached_accumulation_step(core, micro, accelerator)


def _cached_accumulation_step(core: ContrastiveTask, micro: list[Batch], accelerator) -> LossOutput:
    """Exact large-batch gradient over K micro-batches (GradCache, Gao et al. 2021).

    1) embed every micro-batch without grad, remembering the RNG state so dropout and
    augmentation replay identically; 2) loss on all features at once -> d loss / d features;
    3) re-embed each micro-batch with grad and backpropagate those feature gradients.
    Memory stays at one micro-batch of activations; the gradient equals the big batch's.
    """
    mods = core.encoder.modalities
    states, feats = [], []
    with torch.no_grad():
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
        surrogate = sum(
            (f[m] * cached[m].grad[offset : offset + n].to(f[m].dtype)).sum() for m in mods
        )
        surrogate.backward()
        offset += n
    _average_gradients(core)
    return loss


def _rng_snapshot() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    )


def _rng_restore(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _average_gradients(model: nn.Module) -> None:
    """DDP hooks are bypassed in the cached path; average gradients across processes by hand."""
    _, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= size


def _save_checkpoint(
    out_dir: Path,
    step: int,
    core: ContrastiveTask,
    optimizer,
    scheduler,
    accelerator,
    cfg: PretrainConfig,
    position: int,
) -> Path:
    from safetensors.torch import save_file

    final = out_dir / "checkpoints" / f"step-{step}"
    _rank, world_size = world()
    # Every rank's RNG state is needed to replay augmentation; gather them to the main process.
    rng_all = _gather_objects(ckpt.rng_state())
    if accelerator.is_main_process:
        with ckpt.atomic_dir(final) as tmp:
            state = {f"encoder.{k}": v for k, v in encoder_state(core.encoder, cfg).items()}
            state.update(
                {
                    f"loss.{k}": v.detach().cpu().contiguous()
                    for k, v in core.loss.state_dict().items()
                }
            )
            save_file(state, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            for r, state_r in enumerate(rng_all):
                torch.save(state_r, tmp / f"rng-{r}.pt")
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
        ckpt.prune_checkpoints(out_dir, cfg.train.keep_checkpoints)
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
    path: Path, core: ContrastiveTask, optimizer, scheduler, accelerator, rank: int
) -> int:
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
    return int(state["step"])


class _MetricsWriter:
    def __init__(self, path: Path, enabled: bool, cfg: PretrainConfig) -> None:
        self.path, self.enabled = path, enabled
        self.tb = None
        if enabled and cfg.train.tensorboard:
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
