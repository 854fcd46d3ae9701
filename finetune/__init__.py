"""modalign.finetune: few labels + pseudo-labels -> fusion heads over a model bundle's embeddings.

The public surface of the layer (one import path per thing)::

    from modalign.finetune import run_finetune, load_classifier, HEADS, PSEUDO_LABELERS, THRESHOLDS

Importing the package registers the built-in pseudo-labelers (``none``, ``zero_shot``, ``knn``,
``propagation``, ``zero_shot_mix``, ``balanced_kmeans``, ``self_training`` and the default
``auto``), fusion heads and
threshold policies; plugins add theirs through the ``modalign.pseudo_labelers``,
``modalign.heads`` and ``modalign.thresholds`` entry-point groups.
"""

from __future__ import annotations

from modalign.finetune.classifier import Classifier, load_classifier
from modalign.finetune.config import PSEUDO_LABELERS, FinetuneConfig, HeadSpec
from modalign.finetune.head_base import FusionHead
from modalign.finetune.heads import HEADS
from modalign.finetune.pipeline import FinetuneResult, check_finetune_inputs, run_finetune
from modalign.finetune.pseudo.auto import AutoOptions
from modalign.finetune.pseudo.labelers import LabelContext, Labeler, LabelerOutput
from modalign.finetune.pseudo.labels import PseudoLabels
from modalign.finetune.pseudo.thresholds import THRESHOLDS

__all__ = [
    "HEADS",
    "PSEUDO_LABELERS",
    "THRESHOLDS",
    "AutoOptions",
    "Classifier",
    "FinetuneConfig",
    "FinetuneResult",
    "FusionHead",
    "HeadSpec",
    "LabelContext",
    "Labeler",
    "LabelerOutput",
    "PseudoLabels",
    "check_finetune_inputs",
    "load_classifier",
    "run_finetune",
]
