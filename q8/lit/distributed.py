"""Distributed training with Lightning: DDP's two time-outs (start-up, collectives), the ranks a
signal or a lost rank stops, and the exit codes of a fit that stops. Launch environments and the
shared run directory are in q8.lit.launch; Range BN's synchronisation across ranks is
Q8Precision's `sync_range_bn`; each rank's own rounding noise is callbacks/exact_resume.py's.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import strategies
from lightning.pytorch.utilities.exceptions import SIGTERMException

from q8.lit.errors import NonFiniteError, StoppedBySignal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what a scheduler sends before it kills a job


class DDPStrategy(strategies.DDPStrategy):
    """Lightning's DDP with two time-outs. `start_timeout` bounds the start-up, every rank joining
    the process group: a rank imports, builds its data and model and may wait for its node, which
    on a loaded machine takes minutes. `timeout` then bounds each collective: how long the other
    ranks wait for a rank that died or hangs before they stop (see lost_rank_message)."""

    def __init__(self, *args, timeout: timedelta = timedelta(minutes=5),
                 start_timeout: timedelta = timedelta(minutes=15), **kwargs) -> None:
        super().__init__(*args, timeout=max(timeout, start_timeout), **kwargs)
        self.collective_timeout = timeout

    def setup_distributed(self) -> None:
        super().setup_distributed()  # init_process_group: the rendezvous waits start_timeout
        # every later operation of the group waits `timeout` (an older torch names it privately)
        set_timeout = getattr(torch.distributed, "set_timeout", None)
        if set_timeout is None:
            set_timeout = torch.distributed.distributed_c10d._set_pg_timeout
        set_timeout(self.collective_timeout)


@contextlib.contextmanager
def stop_started_ranks_on_signal(trainer: L.Trainer) -> Iterator[None]:
    """While it runs, SIGTERM or SIGUSR1 reaches the ranks this process started (Lightning's
    launcher) at once, then raises StoppedBySignal here (inside fit, ResumableCheckpoint's
    handler takes over and saves instead). At once, not once StoppedBySignal has unwound:
    unwinding tears down the process group, and a rank still joining it would report the lost
    connection instead of the signal."""

    def forward_and_raise(signum: int, frame: object) -> None:
        launcher = getattr(trainer.strategy, "launcher", None)
        # Lightning's SIGTERM handler, which calls this one after its own, forwards it too
        forwarded = signum == signal.SIGTERM and trainer.received_sigterm
        if getattr(launcher, "procs", None) and not forwarded:
            launcher.kill(signum)
        raise StoppedBySignal(signum)

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, forward_and_raise)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def exit_when_fit_stops(trainer: L.Trainer, run_dir: Path) -> Iterator[None]:
    """The ways a fit is stopped, as exit codes with one line each, no traceback:

    - a signal (Lightning's SIGTERMException; ResumableCheckpoint saved last.ckpt): 143,
      128 + SIGTERM as a shell reports a kill, and the command that resumes;
    - NanGuard's NonFiniteError: 1;
    - a rank that died or stopped answering (see lost_rank_message): 1, the others killed.
    """
    try:
        yield
    except SIGTERMException:
        print(f"stopped by a signal; resume with ckpt_path=last hydra.run.dir={run_dir}")
        sys.exit(143)
    except NonFiniteError as ex:
        print(f"error: {ex}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as ex:
        message = lost_rank_message(trainer, ex)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def lost_rank_message(trainer: L.Trainer, ex: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or stopped answering
    (a closed connection, a timeout), naming the ranks this process started (Lightning's
    launcher: ranks 1.. of this node are its children) that died or still run; None for any
    other error. Those still running are killed: they would wait in their own collectives.
    Under torchrun or srun the launcher names the failed rank itself."""
    text = str(ex)
    lost = isinstance(ex, torch.distributed.DistError) or any(
        s in text.lower() for s in ("connection reset by peer", "connection closed by peer",
                                    "timed out", "timeout", "nccl"))
    if trainer.world_size < 2 or not lost:
        return None
    procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    dead = []
    for local_rank, proc in enumerate(procs, start=1):
        for _ in range(30):  # a killed peer's exit status can trail its closed socket
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        code, rank = proc.returncode, trainer.node_rank * trainer.num_devices + local_rank
        if code is None:
            proc.kill()
            dead.append(f"rank {rank} (pid {proc.pid}) stopped answering and was killed")
        elif code != 0:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            dead.append(f"rank {rank} (pid {proc.pid}) died ({how})")
    who = ", ".join(dead) or "another rank died or stopped answering (its log names it)"
    first = text.strip().splitlines()[0] if text.strip() else type(ex).__name__
    return (f"rank {trainer.global_rank} lost the process group: {who}; "
            f"the collective failed with: {first[:300]}")
