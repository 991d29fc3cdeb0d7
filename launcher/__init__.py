"""TrainerEngine: fine-tune causal language models from one TOML job file.

    from launcher import load_config, run_job
    result = run_job(load_config("job.toml"))
"""

from launcher.config import ConfigError, JobConfig, load_config
from launcher.result import TrainingResult


def run_job(config: JobConfig) -> TrainingResult:
    """Run a job on this process, or launch it on several; see `launcher.run.run_job`."""
    from launcher.run import run_job as _run_job

    return _run_job(config)


class TrainerEngine:
    """The seed's shape: `TrainerEngine(status_writer).run_job(config)`."""

    def __init__(self, status_writer=None):
        self.status_writer = status_writer

    def run_job(self, config: JobConfig) -> TrainingResult:
        from launcher.run import run_job as _run_job

        return _run_job(config, status_writer=self.status_writer)


__all__ = ["ConfigError", "JobConfig", "TrainerEngine", "TrainingResult", "load_config", "run_job"]
