"""Train, and SIGKILL this process at a chosen point (no cleanup, no atexit, nothing flushed).

``python kill_at.py MODE N OVERRIDES.json`` (OVERRIDES.json holds the ``--set`` list):

- ``after-checkpoint N``: right after ``checkpoints/step-N`` is complete;
- ``mid-checkpoint N``: inside the write of ``step-N``, after its weight and optimizer files,
  before its state file (the temp folder is never renamed into place);
- ``mid-step N``: inside the forward pass of step N (after the previous checkpoint).

The trainer's functions are wrapped from outside: no test hook in library code.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from modalign.config import load_config
from modalign.pretrain import model, trainer
from modalign.pretrain.checkpoint import state as train_state


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(mode: str, n: int) -> None:
    if mode == "after-checkpoint":
        save = train_state.save_checkpoint

        def save_then_die(state, out_dir, cfg, step, position):
            path = save(state, out_dir, cfg, step, position)
            if step == n:
                die()
            return path

        train_state.save_checkpoint = save_then_die
    elif mode == "mid-checkpoint":
        write = train_state._write_state_files
        seen = {"step": 0}

        def write_then_die(state, tmp, cfg):
            write(state, tmp, cfg)
            seen["step"] += 1
            if seen["step"] == n:
                die()

        train_state._write_state_files = write_then_die
    elif mode == "mid-step":
        forward = model.ContrastiveTask.forward
        calls = {"n": 0}

        def forward_then_die(self, batch, features_only=False):
            out = forward(self, batch, features_only)
            calls["n"] += 1
            if calls["n"] == n:
                die()
            return out

        model.ContrastiveTask.forward = forward_then_die
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    mode, n, overrides_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    arm(mode, n)
    trainer.pretrain(load_config(None, json.loads(Path(overrides_file).read_text("utf-8"))))
