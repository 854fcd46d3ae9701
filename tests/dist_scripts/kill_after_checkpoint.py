"""Train, and SIGKILL this process right after ``checkpoints/step-N`` is complete.

``python kill_after_checkpoint.py N OVERRIDES.json``: OVERRIDES.json holds the ``--set`` list.
Simulates a crash (no cleanup, no atexit, nothing flushed) at a known step, without a test
hook in library code: the trainer's checkpoint writer is wrapped from outside.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from modalign.config import load_config
from modalign.pretrain import trainer
from modalign.pretrain.checkpoint import state as train_state


def main(kill_step: int, overrides_file: str) -> None:
    overrides = json.loads(Path(overrides_file).read_text(encoding="utf-8"))
    save = train_state.save_checkpoint

    def save_then_die(state, out_dir, cfg, step, position):
        path = save(state, out_dir, cfg, step, position)
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    train_state.save_checkpoint = save_then_die
    trainer.pretrain(load_config(None, overrides))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
