"""Run ``modalign ARGS...`` and take this whole "machine" down at a chosen point.

``python machine_dies.py MODE RANK STEP -- ARGS...`` under a per-machine launcher (torchrun started
in its own session, standing in for one machine): on global rank RANK, right after
``checkpoints/step-STEP`` is complete, the launcher's process group and this worker get SIGKILL (``MODE=kill``: the machine died, its sockets are closed by the kernel) or
SIGSTOP (``MODE=stop``: the machine hangs, nothing is closed, the peers hear nothing). With
``MACHINE_DIES_STAMP=FILE`` the victim writes the time it died into FILE first. The
trainer's checkpoint writer is wrapped from outside: no test hook in library code.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from modalign.cli import main as cli_main
from modalign.core.world import world
from modalign.pretrain.checkpoint import state as train_state

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def arm(mode: str, victim: int, at_step: int) -> None:
    save = train_state.save_checkpoint

    def save_then_die(state, out_dir, cfg, step, position):
        path = save(state, out_dir, cfg, step, position)
        if step == at_step and world()[0] == victim:
            if os.environ.get("MACHINE_DIES_STAMP"):  # when it died, for the survivors' timing
                Path(os.environ["MACHINE_DIES_STAMP"]).write_text(repr(time.time()))
            # torchrun starts each worker in a session of its own: the launcher's group, then us
            os.killpg(os.getpgid(os.getppid()), SIGNALS[mode])
            os.kill(os.getpid(), SIGNALS[mode])
        return path

    train_state.save_checkpoint = save_then_die


if __name__ == "__main__":
    mode, victim, at_step, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: machine_dies.py MODE RANK STEP -- ARGS..."
    arm(mode, int(victim), int(at_step))
    raise SystemExit(cli_main(args))
