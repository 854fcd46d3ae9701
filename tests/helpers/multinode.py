"""Two simulated machines on one host: each a ``torchrun --nnodes 2 --node_rank R`` launcher in
a session of its own, rendezvousing at 127.0.0.1 (issue 24's multi-node tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "dist_scripts"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads (then restore): an in-process reference run
    computed with the thread count of the launched workers (``OMP_NUM_THREADS=1``), since a
    matmul's blocking, and so its last bits, follows the thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return out


class Machine:
    """One simulated machine: a torchrun launcher (node ``rank`` of 2) in its own session."""

    def __init__(self, rank: int, port: int, program: list[str], logs: Path, cwd: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        env.update(MACHINE_DIES_STAMP=str(logs / "died-at"))
        self.log = logs / f"machine{rank}.log"
        cmd = [TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(port), *program]  # fmt: skip
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.ended_at: float | None = None

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"machine hung past {timeout} s:\n{self.output()[-3000:]}"
            ) from None
        self.ended_at = self.ended_at or time.time()
        return code

    def kill(self) -> None:
        """SIGKILL the launcher's workers (torchrun gives each a session of its own), then the
        launcher's session; stopped processes die too."""
        for pid in _children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def two_machines(
    program: list[str], logs: Path, cwds: tuple[Path, Path] | None = None
) -> tuple[Machine, Machine]:
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    where = cwds or (logs, logs)
    return Machine(0, port, program, logs, where[0]), Machine(1, port, program, logs, where[1])


def run_ok(program: list[str], logs: Path) -> None:
    machines = two_machines(program, logs)
    codes = [m.wait(300) for m in machines]
    assert codes == [0, 0], "\n".join(m.output()[-3000:] for m in machines)
