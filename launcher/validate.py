"""`python -m launcher validate`: everything a run checks before training, without training."""

from __future__ import annotations

from launcher.config import JobConfig
from loop.data import build_datasets, load_tokenizer
from loop.data.streaming import build_stream
from loop.model import build_model, count_parameters


def validate_job(config: JobConfig, *, num_processes: int | None = None) -> str:
    """Load tokenizer, data and model as a run would; return the human report (raises ConfigError)."""
    tokenizer = load_tokenizer(config)
    # A stream is checked by reading the first records of each source, never tokenized whole.
    data = build_stream(config, tokenizer) if config.data.streaming else build_datasets(config, tokenizer)
    model = build_model(config, tokenizer)
    h = config.hyperparams
    world = num_processes or config.launch.num_processes
    total_steps = config.num_optimizer_steps(len(data.train) if data.train is not None else 0, world)
    _, num_params = count_parameters(model)  # 4-bit weights as the values they hold
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
        "the job is valid." if not data.report.warnings() else
        f"the job is valid, with {len(data.report.warnings())} warning(s) about the data above.",
    ]
    return "\n".join(lines)
