"""`run_job`: run a validated job here, or start several processes to run it.

Inside a distributed launch (`accelerate launch`, torchrun, SLURM's srun, or a Ray Train worker)
every process runs the loop and returns a `TrainingResult`; the main process's is complete and
written to `result.json`. Outside one, a job that asks for more than one process (or names an
Accelerate config) is handed to the real `accelerate launch` CLI running `-m launcher run` on the
resolved job, or with `launch.backend = "ray"` to Ray Train workers; this process waits and returns
the result the main rank wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launcher.config import ConfigError, JobConfig, cuda_available
from launcher.result import TrainingResult, write_atomic

HANDOFF_ENV = "TRAINER_ENGINE_HANDOFF_DIR"  # where a launched job leaves the reason it was refused
REFUSAL_NAME = "refusal.txt"
ELASTIC_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun's default list plus SIGUSR1


def in_distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ or HANDOFF_ENV in os.environ


def should_launch(config: JobConfig) -> bool:
    launch_cfg = config.launch
    return not in_distributed_launch() and (launch_cfg.num_processes > 1 or bool(launch_cfg.accelerate_config)
                                            or launch_cfg.backend == "ray")


def run_job(config: JobConfig, status_writer=None) -> TrainingResult:
    """Run the job and return its result; raises `ConfigError` if the job is refused before training."""
    if should_launch(config):
        return launch_ray(config) if config.launch.backend == "ray" else launch(config)
    result = run_here(config, status_writer)
    if result.success:
        _leave_process_group()
    return result


def run_here(config: JobConfig, status_writer=None) -> TrainingResult:
    """Train in this process, as one rank of whatever process group the launcher set up."""
    _adopt_slurm_environment()
    from loop import preflight
    from loop.train import train

    preflight.prepare_environment()
    try:
        result = train(config, status_writer=status_writer)
    except ConfigError as error:
        preflight.stop_heartbeat()
        # Tell the process that launched us why, so it can refuse the job in one clear message.
        folder = os.environ.get(HANDOFF_ENV)
        if folder and int(os.environ.get("RANK", "0")) == 0:
            write_atomic(Path(folder) / REFUSAL_NAME, str(error))
        raise
    if not result.success and not result.summary.get("preempted"):
        _name_lost_ranks(result, config.output_path)
    preflight.stop_heartbeat()
    folder = os.environ.get(HANDOFF_ENV)
    if folder and not result.success:
        # A rank that failed before the output folder was owned writes nothing there: hand the
        # launching process its result instead.
        write_atomic(Path(folder) / f"result-rank{os.environ.get('RANK', '0')}.json", result.to_json())
    if int(os.environ.get("RANK", "0")) == 0 and (config.output_path / "result.json").exists():
        _maybe_write_report(config.output_path)
    return result


def _leave_process_group() -> None:
    """Tear down the process group the launch set up, once the run has finished.

    Left to interpreter exit, gloo's threads can be destroyed while still joinable, and a rank that
    has written a successful result aborts with SIGABRT ("terminate called without an active
    exception"), so its launcher reports a failure. Only after success: every rank has passed the
    final save's barrier, so no collective is pending (after a failure one may be, and tearing
    down could wait on a peer that is gone).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _name_lost_ranks(result: TrainingResult, output_dir: Path) -> None:
    """After a failed multi-node run, put the ranks that were lost (killed, crashed, machine gone)
    first in the error, here and in result.json, which rank 0 rewrites once the folder is released."""
    from loop.preflight import name_lost_ranks

    lost = name_lost_ranks()
    if lost is None:
        return
    result.error = f"{lost}; the first error: {result.error}"
    path = output_dir / "result.json"
    if int(os.environ.get("RANK", "0")) == 0 and path.exists():
        written = TrainingResult.read(path)
        if not written.success and lost not in (written.error or ""):
            written.error = f"{lost}; the first error: {written.error}"
            written.write(path)


def _maybe_write_report(output_dir: Path) -> None:
    """report.md and loss.png after a run, when matplotlib is installed; never changes the outcome."""
    import importlib.util
    import logging

    if importlib.util.find_spec("matplotlib") is None:
        return
    try:
        from launcher.report import write_report

        write_report(output_dir)
    except Exception as error:  # the run succeeded or failed already; a plot must not change that
        logging.getLogger(__name__).warning("could not write the run report: %s", error)


def launch_command(config: JobConfig, job_file: Path) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and environment for this job.

    With an Accelerate config file, the file decides the topology; `[launch] num_processes` > 1
    overrides its process count. Without one, the job's process count runs as DDP on this machine.
    """
    launch_cfg = config.launch
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ)
    if config.source:
        # The launched ranks read a resolved copy of the job from a temporary folder; a custom profile
        # next to the original job file must still import, exactly as with one process.
        job_folder = str(Path(config.source).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (job_folder, env.get("PYTHONPATH", "")) if p)
    config_file = launch_cfg.accelerate_config
    if config_file:
        command += ["--config_file", config_file]
    else:
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if launch_cfg.num_processes > 1:
            command += ["--multi_gpu"]
    if launch_cfg.num_processes > 1 or not config_file:
        command += ["--num_processes", str(launch_cfg.num_processes)]
    # torchrun's agent dies on a SIGUSR1 it does not handle and leaves its ranks running; in its
    # --signals-to-handle (PET_ is how torchrun reads it from the environment) it passes it on to them.
    env.setdefault("PET_SIGNALS_TO_HANDLE", ELASTIC_SIGNALS)
    sharded = bool(config_file) and _distributed_type(config_file) in ("DEEPSPEED", "FSDP")
    if not cuda_available() and not sharded:
        # Without this Accelerate starts N processes that each believe they are alone (ENVIRONMENT.md).
        # DeepSpeed and FSDP are left alone: they run over gloo themselves, and CPU mode would drop them.
        env["ACCELERATE_USE_CPU"] = "1"
    command += ["--main_process_port", str(launch_cfg.main_process_port or _free_port())]
    command += ["-m", "launcher", "run", str(job_file)]
    return command, env


def _distributed_type(path: str) -> str | None:
    import yaml

    with open(path, encoding="utf-8") as handle:
        return (yaml.safe_load(handle) or {}).get("distributed_type")


def launch(config: JobConfig) -> TrainingResult:
    """Start `accelerate launch` on this job, stream its output, wait, and return its result.

    SIGTERM and SIGUSR1 are passed on to the launched processes, which save a checkpoint and stop.
    """
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="trainer-engine-") as handoff:
        job_file = Path(handoff) / "job.toml"
        job_file.write_text(config.to_toml(), encoding="utf-8")
        command, env = launch_command(config, job_file)
        env[HANDOFF_ENV] = handoff
        process = subprocess.Popen(command, env=env)
        with _forwarding_signals_to(process):
            returncode = process.wait()
        refusal = Path(handoff) / REFUSAL_NAME
        if refusal.exists():
            raise ConfigError(refusal.read_text(encoding="utf-8"))
        handed = sorted(Path(handoff).glob("result-rank*.json"), key=lambda p: p.stat().st_mtime)
        early = TrainingResult.read(handed[0]) if handed else None  # the rank that failed first
    result_file = config.output_path / "result.json"
    if result_file.exists() and result_file.stat().st_mtime >= started:
        result = TrainingResult.read(result_file)
        if returncode != 0 and result.success:
            result.success = False
            result.error = f"a process exited with code {returncode} after training"
        return result
    if early is not None:
        return early
    return TrainingResult(success=False, error=f"accelerate launch exited with code {returncode} before a "
                                               "result was written; see its output above")


def launch_ray(config: JobConfig) -> TrainingResult:
    """Run the job in `launch.num_processes` Ray Train workers and return rank 0's result.

    Ray's `TorchTrainer` sets up the process group (gloo on CPUs, NCCL with GPUs) and the RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT variables before each worker runs
    `_ray_worker`, and the loop's Accelerator takes that group as it is: the same loop, data shards
    and checkpoints as under `accelerate launch`. Uses the cluster in RAY_ADDRESS (or one this
    process already joined), else starts a local one for this job and stops it afterwards.

    SIGTERM and SIGUSR1 here stop the run as under `accelerate launch`: every worker saves a
    checkpoint at its next step boundary and the result says "preempted" (exit code 3). Ray calls
    the workers' function in a thread, where the loop cannot install signal handlers, so this
    process takes the signal and leaves it in a small Ray actor that rank 0 polls
    (`loop.preemption.relaying_stop_requests`); the step's all-reduce makes all ranks stop at the same step.
    """
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig, TrainingFailedError
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise ConfigError('launch.backend = "ray" needs Ray Train: pip install "trainer-engine[ray]" '
                          '(or pip install "ray[train]")') from None
    if config.launch.accelerate_config:
        raise ConfigError('launch.accelerate_config is read by `accelerate launch` only; with launch.backend = '
                          '"ray" Ray places the processes. Remove one of the two.')
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    use_gpu = cuda_available()
    try:
        # Ends with its last handle (the payload's), or with the local cluster.
        stop_request = ray.remote(num_cpus=0)(_StopRequest).remote()
        payload = {"job": config.to_toml(), "stop_request": stop_request,
                   "job_folder": str(Path(config.source).resolve().parent) if config.source else ""}
        with tempfile.TemporaryDirectory(prefix="trainer-engine-ray-") as storage:
            trainer = TorchTrainer(
                _ray_worker, train_loop_config=payload,
                scaling_config=ScalingConfig(num_workers=config.launch.num_processes, use_gpu=use_gpu),
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo",
                                         timeout_s=config.launch.timeout_minutes * 60),
                run_config=RunConfig(name="trainer-engine", storage_path=storage))
            try:
                with _relaying_signals_to(stop_request):
                    value = trainer.fit().return_value
            except TrainingFailedError as error:
                return TrainingResult(success=False, error=f"a Ray Train worker failed: {error}")
    finally:
        if started_ray:
            ray.shutdown()
    returned = json.loads(value)
    if "refused" in returned:
        raise ConfigError(returned["refused"])
    return TrainingResult.from_json(value)


class _StopRequest:
    """The stop signal the Ray driver received, kept in a Ray actor for the workers to poll."""

    def __init__(self):
        self.signal_name: str | None = None

    def set(self, signal_name: str) -> None:
        self.signal_name = self.signal_name or signal_name

    def get(self) -> str | None:
        return self.signal_name


@contextlib.contextmanager
def _relaying_signals_to(stop_request):
    """While open, SIGTERM and SIGUSR1 to this process (the Ray driver) are left in `stop_request`."""
    import logging

    def relay(signum, frame):
        name = signal.Signals(signum).name
        logging.getLogger(__name__).warning("received %s: the Ray workers stop after a checkpoint at their "
                                            "next step boundary", name)
        # Ray's own SIGINT handler calls its actors from the handler the same way.
        stop_request.set.remote(name)

    previous = {sig: signal.signal(sig, relay) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ray_worker(payload: dict) -> str:
    """One Ray Train worker: the job on the process group Ray set up. Rank 0's return value becomes
    the driver's result; a refused job comes back as {"refused": message}."""
    import ray

    from launcher.cli import _setup_logging  # the same log format and levels as `python -m launcher run`
    from launcher.config import load_config
    from loop.preemption import relaying_stop_requests

    def stop_requested() -> str | None:
        name = ray.get(payload["stop_request"].get.remote(), timeout=60)
        return f"{name} to the Ray driver" if name else None

    _setup_logging()
    if payload["job_folder"] and payload["job_folder"] not in sys.path:
        sys.path.insert(0, payload["job_folder"])  # a custom profile next to the job file imports, as with one process
    with tempfile.TemporaryDirectory(prefix="trainer-engine-") as folder:
        job_file = Path(folder) / "job.toml"
        job_file.write_text(payload["job"], encoding="utf-8")
        # This thread cannot take signals. Rank 0 alone asks the driver (the step's all-reduce tells the
        # others), so that its result names what stopped the run.
        is_rank0 = int(os.environ.get("RANK", "0")) == 0
        relay = relaying_stop_requests(stop_requested) if is_rank0 else contextlib.nullcontext()
        try:
            with relay:
                result = run_here(load_config(job_file))  # Ray tears down the process group it set up
        except ConfigError as error:
            return json.dumps({"refused": str(error)})
    return result.to_json()


@contextlib.contextmanager
def _forwarding_signals_to(process: subprocess.Popen):
    def forward(signum, frame):
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _adopt_slurm_environment() -> None:
    """Under `srun` without torchrun, map SLURM's variables to the ones torch.distributed reads."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    if "MASTER_ADDR" not in os.environ:
        return  # not set up for a direct srun launch; the sbatch example uses accelerate launch per node
    os.environ.update(WORLD_SIZE=os.environ["SLURM_NTASKS"], RANK=os.environ["SLURM_PROCID"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_PORT", "29500")
