"""Fine-tuning configuration (the ``finetune`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class FinetuneConfig:
    model: str = ""  # pretrained model bundle dir
    train: str = ""  # manifest with labels (few labeled + the rest unlabeled)
    test: str = ""  # held-out manifest for evaluation
    out: str = ""  # classifier bundle dir ("" = <output.dir>/classifier)
    class_names: list[str] = field(default_factory=list)  # "" = sorted distinct labels
    inputs: list[str] = field(default_factory=lambda: ["image", "audio"])  # classifier modalities
    labels_per_class: int = 5
    val_per_class: int = 0  # labeled validation rows per class (early stopping); 0 = off
    label_seed: int = 0
    pseudo_label: Literal["none", "zero_shot", "knn", "self_training"] = "zero_shot"
    prompts: list[str] = field(
        default_factory=lambda: [
            "{}",
            "the number {}",
            "a picture of the digit {}",
            "someone saying {}",
        ]
    )
    threshold: float = 0.5  # min pseudo-label confidence kept
    zero_shot_temperature: float = 0.02
    knn_k: int = 10
    knn_iterations: int = 100
    balance: bool = True
    balance_ratio: float = 1.5  # a class keeps at most ratio x the smallest class's count
    rounds: int = 1
    # self_training (FixMatch-style over cached views)
    threshold_policy: Literal["fixed", "flexmatch", "freematch"] = "fixed"
    tau: float = 0.95
    strong_views: int = 2
    strong_audio_noise: float = 0.5  # max noise RMS relative to the clip's RMS
    unlabeled_weight: float = 1.0
    head: Literal["concat", "late", "gated", "transformer", "lowrank"] = "late"
    hidden: int = 256
    epochs: int = 60
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    modality_dropout: float = 0.3
    pseudo_weight: float = 1.0
    seed: int = 0
