"""Launch environments: which rank a process is and the run directory all ranks share.

Every launch path runs train.py's `@hydra.main` on every rank, so every rank composes the
configuration and must arrive at the same run directory:

- Lightning's own launcher (`python train.py trainer=ddp`): it starts ranks 1.. with
  `hydra.run.dir=<rank 0's run dir>`.
- torchrun: the run is named `torchrun-<rendezvous id>` (TORCHELASTIC_RUN_ID), or, without
  one, after the torchrun process every local rank is a child of.
- SLURM (srun, Lightning's SLURMEnvironment): `slurm-<job id>`, the same for every task, and
  again for the job after a requeue, which finds its checkpoints there (Lightning's
  `hpc_ckpt_<n>.ckpt`, `checkpoints/last.ckpt`; scripts/slurm/train.sbatch resumes).

The name is passed to conf/hydra/default.yaml in Q8_RUN_ID (set it yourself to choose it).
Ranks > 0 write nothing into the run directory: no `.hydra/`, no log file; Lightning writes
checkpoints and logs on rank 0, train.py writes metrics.json there.

Standard library only: train.py uses it before the configuration is validated and before
Lightning (seconds to import) is loaded. The Lightning parts are in q8.lit.distributed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, MutableMapping, Sequence

# Every variable that a launcher sets to the process's rank: torchrun (RANK, LOCAL_RANK),
# Lightning's own launcher (LOCAL_RANK, NODE_RANK), srun (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")

# The overrides that keep a rank > 0 from writing `.hydra/` and `<job name>.log`.
_QUIET_RANK_OVERRIDES = {
    "hydra.output_subdir": "hydra.output_subdir=null",
    "hydra/job_logging": "hydra/job_logging=stdout",
}


def is_rank_zero(env: Mapping[str, str] = os.environ) -> bool:
    """False in a process that torchrun, srun or Lightning started as a rank other than 0."""
    return all(env.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def slurm_job_id(env: Mapping[str, str] = os.environ) -> str | None:
    """The SLURM job id as Lightning's requeue names it (`<array job>_<task>` in an array),
    or None outside a SLURM job or in an interactive one (job name `bash`/`interactive`,
    which Lightning does not treat as a SLURM job either)."""
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def run_id(env: Mapping[str, str] = os.environ) -> str | None:
    """The run directory's name that every rank of this launch agrees on, or None for a
    process that no launcher started (the start time names its run)."""
    if env.get("Q8_RUN_ID"):
        return env["Q8_RUN_ID"]
    job = slurm_job_id(env)
    if job is not None:
        return f"slurm-{job}"
    if "TORCHELASTIC_RUN_ID" in env:
        rendezvous = env["TORCHELASTIC_RUN_ID"]
        if rendezvous and rendezvous != "none":  # --standalone draws one; --rdzv-id sets one
            return f"torchrun-{rendezvous}"
        # torchrun's default id is "none": name the run after the torchrun process, the
        # parent of every local rank (several nodes need --rdzv-id or hydra.run.dir).
        return f"torchrun-{_parent_stamp()}"
    return None


def _parent_stamp() -> str:
    """`<start time>-<pid>` of the parent process (Linux /proc), else its pid alone."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat") as f:  # field 22: start, in clock ticks since boot
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return str(ppid)
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S', time.localtime(started))}-{ppid}"


def launch_overrides(argv: Sequence[str],
                     env: MutableMapping[str, str] = os.environ) -> list[str]:
    """Before Hydra composes the config: export Q8_RUN_ID (the shared run directory's name)
    and return the Hydra overrides that keep this process, if a rank > 0, from writing
    `.hydra/` and a log file into it (overrides already in `argv` are left alone)."""
    name = run_id(env)
    if name is not None:
        env["Q8_RUN_ID"] = name
    if is_rank_zero(env):
        return []
    given = {arg.lstrip("+~").split("=", 1)[0] for arg in argv}
    return [value for key, value in _QUIET_RANK_OVERRIDES.items() if key not in given]


def close_log_files_off_rank_zero(env: Mapping[str, str] = os.environ) -> None:
    """On a rank > 0, stop logging to files: covers launchers that do not go through
    launch_overrides(), such as the submitit launcher running every task of a sweep job."""
    if is_rank_zero(env):
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def log_each_line_once() -> None:
    """Lightning's loggers print through a handler of their own when they are imported before
    Hydra configures logging, and their records then reach Hydra's console handler too: every
    Lightning line, the model summary included, appeared twice. Their own console handlers go;
    their records reach Hydra's handlers (console and <run dir>/train.log) once."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
        logger.propagate = True
