"""Start the asynchronous pipeline: one process per stage, by torchrun/accelerate or locally.

Under ``torchrun --nproc-per-node P`` (or ``accelerate launch --multi_gpu --num_processes P``,
which runs torchrun's launcher) the usual ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
variables are set and :func:`run_from_environment` joins the group (see :func:`launch_mode`). :func:`run_local` spawns P processes on this machine over gloo on 127.0.0.1
(``PipelineJob.threads`` threads each, default 1, as oversubscribed threads make small-matrix work 30-50x
slower).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from basisrot_pipeline.runtime.pipeline import AsyncPipelineWorker, PipelineJob, read_stage_checkpoint
from shin_common import CorruptFileError, load_json, write_json_atomic
from shin_common.runner import KNOWN_ERRORS

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LOSSES_NAME = "losses.json"  # the last stage's per-minibatch losses, written when all stages are done


def read_losses(path: str | os.PathLike[str]) -> tuple[dict[int, float], int]:
    """The per-minibatch losses in ``losses.json`` and the number of minibatches the run had done."""
    payload = load_json(path)
    try:
        losses = {int(m): float(v) for m, v in payload["losses"].items()}
        next_backward = int(payload["next_backward"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptFileError(path, "expected {'losses': {minibatch: loss}, 'next_backward': int}") from exc
    return losses, next_backward


def _run_rank(job: PipelineJob, rank: int, device: torch.device, result_dir: Path | None) -> dict[int, float]:
    state = None if job.resume_step is None else read_stage_checkpoint(job, job.resume_step, rank, device)
    worker = AsyncPipelineWorker(job, rank, device)
    if state is not None:
        worker.restore(state, job.resume_step)
    losses = worker.run()
    if result_dir is not None and worker.next_backward == job.steps:
        worker.save_final_weights(result_dir)  # before the barrier: all stages are on disk after it
    dist.barrier()
    if result_dir is not None and worker.is_last:
        payload = {
            "losses": {str(m): v for m, v in sorted(losses.items())},
            "next_backward": worker.next_backward,
            "threads": torch.get_num_threads(),  # what the run used, for its record
        }
        write_json_atomic(result_dir / LOSSES_NAME, payload)
    dist.barrier()  # losses.json is on disk for rank 0, which writes the run record under a launcher
    return losses


def _local_entry(rank: int, job: PipelineJob, port: int, result_dir: str, errors: Any) -> None:
    torch.set_num_threads(job.threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=job.num_stages,
            timeout=timedelta(seconds=300),
        )
        try:
            _run_rank(job, rank, torch.device("cpu"), Path(result_dir))
        finally:
            dist.destroy_process_group()
    except KNOWN_ERRORS as exc:
        # a bad or corrupt checkpoint, a full disk: the parent reports it in one line (the traceback
        # still reaches it through torch's error file, shown with --debug)
        errors.put((rank, " ".join(str(exc).split()) or type(exc).__name__))
        raise


class StageProcessError(ValueError):
    """A known error (a corrupt checkpoint, a bad value, a file-system error) in a spawned stage process."""

    def __init__(self, rank: int, num_stages: int, message: str) -> None:
        self.rank = rank
        super().__init__(f"pipeline stage {rank} of {num_stages}: {message}")


def run_local(job: PipelineJob, result_dir: str | os.PathLike[str] | None = None) -> dict[int, float]:
    """Spawn ``job.num_stages`` gloo processes here and return the per-minibatch losses of the run.

    A known error in a stage process is raised here as :class:`StageProcessError` with its one-line
    message; on Ctrl-C the stage processes are stopped before ``KeyboardInterrupt`` propagates.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(result_dir) if result_dir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(job.threads)
        errors = mp.get_context("spawn").SimpleQueue()
        try:
            context = mp.start_processes(
                _local_entry,
                args=(job, free_port(), str(out), errors),
                nprocs=job.num_stages,
                join=False,
                start_method="spawn",
            )
            _join(context, errors, job.num_stages)
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
            errors.close()
        losses, _ = read_losses(out / LOSSES_NAME)
    return losses


def _join(context: Any, errors: Any, num_stages: int) -> None:
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    # join() logs a warning for each stage it stops after another failed: the error is reported once, below
    spawn_log.setLevel(logging.ERROR)
    try:
        while not context.join():
            pass
    except KeyboardInterrupt:
        # A Ctrl-C in a terminal reaches the stage processes too, but a SIGINT sent to this process
        # alone would leave them training (and multiprocessing would wait for them at exit).
        _stop(context.processes)
        raise
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:  # join() stopped the others
        if not errors.empty():
            rank, message = errors.get()
            raise StageProcessError(rank, num_stages, message) from exc
        raise
    finally:
        spawn_log.setLevel(level)


def _stop(processes: list[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()


def run_from_environment(job: PipelineJob, result_dir: str | os.PathLike[str] | None = None) -> dict[int, float]:
    """Join the process group set up by torchrun / accelerate launch (one process per stage)."""
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != job.num_stages:
        raise ValueError(f"launched {world_size} processes for {job.num_stages} stages; they must be equal")
    use_cuda = job.device == "cuda" and torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        # the job's count, not the launcher's OMP_NUM_THREADS: the emulated runtime uses the same one
        torch.set_num_threads(job.threads)
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        out = Path(result_dir) if result_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        return _run_rank(job, dist.get_rank(), device, out)
    finally:
        dist.destroy_process_group()


PROCESS_GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# The number of processes an MPI or Slurm launcher started together (Open MPI, MPICH/Intel MPI and
# Slurm's PMI, MVAPICH2, Slurm's srun step). Only a count above 1 means other copies of this
# process exist: Slurm sets PMI_SIZE/PMIX_RANK in every task, also for ``srun -n 1``. The job-wide
# SLURM_NTASKS is not used: an sbatch script that runs one process sees the allocation's count.
MPI_WORLD_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def mpi_world_size(env: Mapping[str, str]) -> tuple[str, int] | None:
    """The first MPI/Slurm world-size variable in ``env`` that counts more than one process, if any."""
    for name in MPI_WORLD_SIZE_VARIABLES:
        if name not in env:
            continue
        try:
            size = int(env[name])
        except ValueError:
            raise ValueError(f"{name}={env[name]!r}: expected the number of processes started (an integer)") from None
        if size > 1:
            return name, size
    return None


def launch_mode(environ: Mapping[str, str] | None = None) -> str:
    """``"process-group"`` when this process is one of P started by a launcher, else ``"local"``.

    ``torchrun`` (``torch.distributed.run``) sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in
    every process; so does ``accelerate launch --multi_gpu`` (it calls ``torch.distributed.run``,
    also on a CPU-only machine). ``accelerate launch --cpu`` (and accelerate on a machine without
    GPUs unless ``--multi_gpu`` is given) runs its "simple launcher": ONE process with only
    MASTER_ADDR/MASTER_PORT and ACCELERATE_* variables and no RANK; that process is "local" and
    spawns the P stage processes itself. accelerate's ``--mpirun_hostfile`` (or ``mpirun -n P``,
    ``srun -n P``) starts P processes under MPI, which set no RANK/WORLD_SIZE: refused, as they would
    otherwise each spawn a pipeline. A single MPI/Slurm task (``srun -n 1``) is "local".
    """
    env = os.environ if environ is None else environ
    present = [name for name in PROCESS_GROUP_VARIABLES if name in env]
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [name for name in PROCESS_GROUP_VARIABLES if name not in env]
        if missing:
            raise ValueError(
                f"RANK/WORLD_SIZE are set but {', '.join(missing)} are not; launch with torchrun or "
                "accelerate launch --multi_gpu, which set all of " + ", ".join(PROCESS_GROUP_VARIABLES)
            )
        return "process-group"
    if (started := mpi_world_size(env)) is not None:
        name, size = started
        raise ValueError(
            f"started under MPI as one of {size} processes ({name}={size}; e.g. accelerate launch "
            "--mpirun_hostfile or srun -n P), which sets no RANK/WORLD_SIZE; launch with torchrun, "
            "accelerate launch --multi_gpu, or a single process that spawns the stages"
        )
    if present and any(name.startswith("ACCELERATE_") for name in env):
        logger.info(
            "accelerate's single-process launcher (no RANK set): spawning one process per stage here; "
            "use accelerate launch --multi_gpu --num_processes P to have accelerate start them"
        )
    return "local"


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a launcher-started group (see :func:`launch_mode`)."""
    return launch_mode() == "process-group"
