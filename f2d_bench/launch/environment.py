"""``--shard auto``: the shard and device of this process, read from its launcher's environment.

Two levels are read, and multiplied when both are present:

- outer: a SLURM job array (``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_MIN``/``MAX``/``STEP``, or
  ``SLURM_ARRAY_TASK_COUNT``): one array task per shard;
- inner: torchrun / accelerate (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else SLURM tasks started by
  ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``).

An array of 4 tasks with 8 ranks each is 32 shards. With an inner level, the process is pinned to
GPU ``<local rank>`` through ``CUDA_VISIBLE_DEVICES`` (the ``local rank``-th entry of the list the launcher
gave, or of the node's GPUs when it gave none, modulo their number; left alone when the launcher already
shows the task one GPU, as ``srun --gpus-per-task=1`` does), so the config's ``auto``/``cuda`` device is
that GPU and the CPU where there is none. The config itself is left untouched, so every rank resolves
the same device name, and ``--device`` still overrides it as usual (the grid hash leaves the device out
either way).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, MutableMapping

from f2d_bench.errors import ConfigError
from f2d_bench.grid import Shard

#: Every variable ``--shard auto`` reads, for the error that none was found.
LAUNCH_VARIABLES = (
    "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP",
    "SLURM_ARRAY_TASK_COUNT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
    "SLURM_LOCALID",
)


@dataclass(frozen=True)
class Launch:
    """What ``--shard auto`` found: the shard, the local rank (None: no per-device level) and from where."""

    shard: Shard
    local_rank: int | None
    launcher: str  # e.g. "torchrun", "SLURM array", "SLURM array x SLURM tasks"
    variables: dict[str, str] = field(default_factory=dict)  # the variables it was read from
    #: the SLURM array's task count (None: no array) and the ranks each task starts (1: none)
    array_tasks: int | None = None
    ranks: int = 1

    def describe(self) -> str:
        """One line for the command's output: launcher, variables and shard."""
        names = " ".join(f"{k}={v}" for k, v in self.variables.items())
        return f"--shard auto: {self.launcher} ({names}) -> shard {self.shard.index}/{self.shard.count}"


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name].strip()
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--shard auto: {name}={value!r} is not an integer") from None


def _array(env: Mapping[str, str]) -> tuple[int, int, dict[str, str]] | None:
    """(0-based index, count, variables) of a SLURM array task, or None outside an array."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    used = {"SLURM_ARRAY_TASK_ID": env["SLURM_ARRAY_TASK_ID"]}
    if "SLURM_ARRAY_TASK_MIN" in env and "SLURM_ARRAY_TASK_MAX" in env:
        low, high = _int(env, "SLURM_ARRAY_TASK_MIN"), _int(env, "SLURM_ARRAY_TASK_MAX")
        step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        used |= {k: env[k] for k in ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP")
                 if k in env}
        if step < 1 or (task - low) % step or not low <= task <= high:
            raise ConfigError(f"--shard auto: SLURM array task {task} is not in {low}-{high}:{step}")
        count = (high - low) // step + 1
        if "SLURM_ARRAY_TASK_COUNT" in env and _int(env, "SLURM_ARRAY_TASK_COUNT") != count:
            # --array=1,3,7 or a %-limited list: its ids do not map onto 1..N.
            raise ConfigError(
                f"--shard auto: the SLURM array has {env['SLURM_ARRAY_TASK_COUNT']} tasks but spans "
                f"{low}-{high}:{step}, so its ids do not map onto shards 1..N. To rerun some tasks of an array "
                "of N shards numbered from 0 (--array=0-<N-1>), give the shard in the batch script: "
                "--shard $((SLURM_ARRAY_TASK_ID + 1))/N")
        return (task - low) // step, count, used
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
        used["SLURM_ARRAY_TASK_COUNT"] = env["SLURM_ARRAY_TASK_COUNT"]
        if not 0 <= task < count:
            raise ConfigError(f"--shard auto: SLURM_ARRAY_TASK_ID={task} without SLURM_ARRAY_TASK_MIN must be "
                              f"in 0..{count - 1}")
        return task, count, used
    raise ConfigError("--shard auto: SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_MIN/MAX nor "
                      "SLURM_ARRAY_TASK_COUNT is")


def _ranks(env: Mapping[str, str]) -> tuple[str, int, int, int | None, dict[str, str]] | None:
    """(launcher, 0-based rank, world size, local rank or None, variables) of torchrun or srun tasks."""
    for launcher, rank, size, local in (("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                        ("SLURM tasks", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in env and size in env:
            r, n = _int(env, rank), _int(env, size)
            if n < 1 or not 0 <= r < n:
                raise ConfigError(f"--shard auto: {rank}={r} is not in 0..{n - 1} ({size}={n})")
            used = {rank: env[rank], size: env[size]}
            loc = None
            if local in env:
                loc = _int(env, local)
                used[local] = env[local]
            return launcher, r, n, loc, used
    return None


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch:
    """The shard and local rank of this process from its launcher's environment variables.

    ``environ`` defaults to ``os.environ``. Raises ConfigError naming the variables it reads when it
    finds none of them.
    """
    env = os.environ if environ is None else environ
    array, ranks = _array(env), _ranks(env)
    if ranks is not None and ranks[0] == "SLURM tasks" and ranks[2] == 1:
        ranks = None  # the batch step of an array task: SLURM_PROCID=0 of 1 says nothing more
    if array is None and ranks is None:
        raise ConfigError(
            "--shard auto found no launcher: it reads SLURM job arrays (SLURM_ARRAY_TASK_ID with "
            "SLURM_ARRAY_TASK_MIN/MAX or SLURM_ARRAY_TASK_COUNT), torchrun/accelerate (RANK, WORLD_SIZE, "
            "LOCAL_RANK) and srun tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). Start this command "
            "under one of them, or give the shard yourself with --shard i/N")
    outer_i, outer_n, used = array if array is not None else (0, 1, {})
    names, local = [], None
    if array is not None:
        names.append("SLURM array")
    if ranks is not None:
        launcher, inner_i, inner_n, local, inner_used = ranks
        names.append(launcher)
        used = {**used, **inner_used}
        # LOCAL_RANK is unset only by hand-made environments; the rank on one node is then the best guess.
        local = inner_i if local is None else local
    else:
        inner_i, inner_n = 0, 1
    shard = Shard(outer_i * inner_n + inner_i + 1, outer_n * inner_n)
    return Launch(shard, local, " x ".join(names), used, array_tasks=outer_n if array is not None else None,
                  ranks=inner_n)


def check_array_layout(launch: Launch, layouts: set[int], run_root) -> None:
    """ConfigError when ``--shard auto`` read a SLURM array that splits the run into another number of
    shards than the ``layouts`` (shard counts > 1) it was generated with: resubmitting some tasks of an
    array (``--array=5``) makes a new, smaller array, and would silently change the layout (other
    batches, other rounding; a running task of the first array would refuse it, or be refused)."""
    sharded = sorted(n for n in layouts if n > 1)
    if launch.array_tasks is None or not sharded or launch.shard.count in sharded:
        return
    m = sharded[-1]
    if launch.ranks == 1:
        how = f"give the shard in the batch script: --shard $((SLURM_ARRAY_TASK_ID + 1))/{m}"
    else:  # the rank differs per process: the batch script's shell cannot expand it once for all
        rank = "RANK" if "RANK" in launch.variables else "SLURM_PROCID"
        how = (f"give each process its own --shard i/{m}, i = SLURM_ARRAY_TASK_ID x {launch.ranks} + {rank} + 1, "
               f"expanded in that process (e.g. srun bash -c '... --shard $((SLURM_ARRAY_TASK_ID * {launch.ranks} "
               f"+ {rank} + 1))/{m}')")
    raise ConfigError(
        f"--shard auto: this SLURM array makes {launch.shard.count} shard(s), but {run_root} was generated as "
        f"{' and '.join(map(str, sharded))} shards (manifests/shard-*-of-{m}.jsonl); a resubmitted part of an "
        f"array would change the layout. To rerun tasks of the {m}-shard array (ids from 0), {how}; to change "
        "the layout on purpose, give --shard i/N yourself")


def node_gpu_count(driver_dir: str | os.PathLike = "/proc/driver/nvidia/gpus") -> int | None:
    """NVIDIA GPUs on this node, from the driver's folder (one entry per GPU), without starting CUDA or
    importing torch; None where the folder is absent (no NVIDIA driver, not Linux)."""
    try:
        return len(os.listdir(driver_dir)) or None
    except OSError:
        return None


def pinned_devices(local_rank: int, visible: str | None, gpus: int | None = None) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value for ``local_rank`` given the current one (None: leave it).

    A list of several devices gives its ``local_rank``-th entry (modulo its length); one device or an
    empty value (no GPU) is kept; unset gives ``local_rank`` modulo ``gpus`` (the node's GPU count, when
    known), so more ranks than GPUs share them as with a list, rather than naming a GPU that is not there.
    """
    if visible is None:
        return str(local_rank % gpus if gpus else local_rank)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return ids[local_rank % len(ids)] if len(ids) > 1 else None


def pin_device(launch: Launch, environ: MutableMapping[str, str] | None = None) -> str:
    """Pin this process to its local rank's GPU (before CUDA starts) and say which; returns that line.

    Sets ``CUDA_VISIBLE_DEVICES`` in ``environ`` (default ``os.environ``), so it must run before torch
    first touches CUDA.
    """
    env = os.environ if environ is None else environ
    if launch.local_rank is None:
        return "device: the config's (no local rank to pin)"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    value = pinned_devices(launch.local_rank, visible, node_gpu_count() if visible is None else None)
    if value is not None:
        env["CUDA_VISIBLE_DEVICES"] = value
    return (f"device: local rank {launch.local_rank} -> CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r} "
            "(the config's auto/cuda is that GPU, the CPU where there is none)")


def shard_argument(text: str | None) -> tuple[Shard, str | None, Launch | None]:
    """The ``--shard`` value of a command: (shard, what ``auto`` found and pinned, what it read), the
    last two None unless ``auto``.

    ``text`` is ``i/N``, ``auto`` or None (the whole run). ``auto`` also pins the device (see
    :func:`pin_device`).
    """
    from f2d_bench.grid import UNSHARDED

    if text is None:
        return UNSHARDED, None, None
    if text.strip().lower() != "auto":
        return Shard.parse(text), None, None
    launch = detect_launch()
    return launch.shard, f"{launch.describe()}; {pin_device(launch)}", launch
