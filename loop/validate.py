"""`python -m launcher validate`: everything a run checks before training, without training."""

from __future__ import annotations

import math

from launcher.config import JobConfig
from loop.data import build_datasets, load_tokenizer
from loop.model import build_model


def validate_job(config: JobConfig, *, num_processes: int | None = None) -> str:
    """Load tokenizer, data and model as a run would; return the human report (raises ConfigError)."""
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer)
    model = build_model(config, tokenizer)
    h = config.hyperparams
    world = num_processes or config.launch.num_processes
    batches_per_process = math.ceil(len(data.train) / (h.batch_size * world))
    total_steps = config.total_steps(batches_per_process)
    num_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"job: {config.source}",
        f"model: {config.model.model_path} ({type(model).__name__}, {num_params:,} parameters)",
        "",
        data.report.format(),
        "",
        f"optimizer steps: {total_steps} (global batch {config.global_batch_size(world)} = batch_size "
        f"{h.batch_size} x gradient_accumulation {h.gradient_accumulation} x {world} process(es))",
        f"validation examples: {len(data.validation) if data.validation is not None else 0}",
        "",
        "one rendered example, trained spans marked:",
        data.report.render_example(tokenizer),
        "",
        "the job is valid.",
    ]
    return "\n".join(lines)
