"""The training loop: one function, read top to bottom, the same on one process and many.

    from launcher import load_config
    from loop.train import train
    result = train(load_config("job.toml"))   # or: accelerate launch -m launcher run job.toml

Builders sit above `train`; `fit` is the loop. Each optimizer step does, in order: take the
accumulation window, forward/backward each micro-batch, clip, check for non-finite values, step,
log, maybe evaluate, maybe save. Accelerate hides the process count, DDP/DeepSpeed/FSDP wrapping
and autocast, so the loop never branches on them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from launcher.config import PRECISIONS, ConfigError, JobConfig
from launcher.result import TrainingResult
from loop.checkpoint import Checkpointer, Progress, RunShape, resume_settings
from loop.data import IGNORE_INDEX, build_dataloader, build_datasets, load_tokenizer
from loop.data.batches import NUM_REAL_TOKENS
from loop.data.streaming import StreamLoader, build_stream, build_stream_loader
from loop.identity import check_identity
from loop.loss import choose_loss_head, router_aux_coef, summed_token_loss
from loop.manifest import build_manifest
from loop.model import build_model, count_parameters, register_checkpoint_hooks, save_final_model
from loop.preemption import Preempted, StopFlag
from loop.preflight import check_cluster
from loop.preview import generate_previews, preview_prompts
from loop.run_dir import RunDir, check_output_dir, completed_result, new_run_id
from loop.throughput import device_peak_flops, mfu, peak_memory_bytes

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient norm; the step that produced it is never applied."""


# --- builders -----------------------------------------------------------------------------------

def build_accelerator(config: JobConfig):
    """The Accelerator for this job: precision, accumulation and process group from the job file."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    h = config.hyperparams
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not torch.distributed.is_initialized():
        _forget_accelerator_state()
    sharded = any(os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true" for name in ("DEEPSPEED", "FSDP"))
    # Several processes without CUDA: gloo, and CPU mode so Accelerate shards data and wraps DDP
    # (without it every rank trains alone on everything, ENVIRONMENT.md). DeepSpeed and FSDP keep
    # cpu=False: they run over gloo by themselves, and cpu=True would silently drop them for DDP.
    on_cpu = world_size > 1 and not torch.cuda.is_available()
    process_group = InitProcessGroupKwargs(timeout=timedelta(minutes=config.launch.timeout_minutes),
                                           backend="gloo" if on_cpu else None)
    accelerator = Accelerator(
        cpu=on_cpu and not sharded,
        mixed_precision=PRECISIONS[h.fp_precision].mixed_precision,
        gradient_accumulation_steps=h.gradient_accumulation,
        log_with=config.environment.report_to or None,
        project_dir=config.output.output_dir,
        kwargs_handlers=[process_group],
    )
    if accelerator.num_processes != world_size or (world_size > 1 and accelerator.distributed_type.value == "NO"):
        raise RuntimeError(
            f"WORLD_SIZE is {world_size} but Accelerate set up {accelerator.num_processes} process(es) with "
            f"distributed type {accelerator.distributed_type.value}: every rank would train alone on all the data. Launch with `python -m launcher run` or `accelerate launch "
            "--multi_gpu` (on CPU machines set ACCELERATE_USE_CPU=1).")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # the job decides, not a default (and a stream has no prepared loader to read it from)
        for key, value in (("gradient_clipping", h.max_grad_norm), ("train_micro_batch_size_per_gpu", h.batch_size)):
            if plugin.deepspeed_config.get(key, "auto") == "auto":
                plugin.deepspeed_config[key] = value
    return accelerator


def _forget_accelerator_state() -> None:
    """Accelerate keeps one state per process and refuses a second Accelerator with another precision:
    a second job in the same Python process (a notebook, a sweep) would fail. With one process and
    no process group there is nothing to keep, so it starts afresh (a private Accelerate call, kept here)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def build_optimizer(model, config: JobConfig) -> torch.optim.Optimizer:
    """`hyperparams.optimizer`, with no weight decay on biases and norm weights (the 1-D parameters).

    adamw: torch's AdamW, fused (one kernel for all parameters, on CUDA and CPU) unless DeepSpeed,
    which steps its own flattened partitions, or 4-bit models with their mixed dtypes.
    adamw_8bit, paged_adamw_8bit: bitsandbytes' 8-bit AdamW (states in 8 bits: 2 bytes a parameter
    instead of 8; the paged one spills states to CPU memory under GPU memory pressure).
    adafactor: torch's Adafactor, factored second moments and no first moment (a few bytes a row
    and column of each matrix instead of 8 bytes a parameter).
    """
    h = config.hyperparams
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": h.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    if h.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=h.learning_rate, eps=(None, h.adam_epsilon))
    if h.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(f"hyperparams.optimizer = {h.optimizer!r} needs bitsandbytes: pip install "
                              "'trainer-engine[qlora]', or choose \"adamw\" or \"adafactor\"") from None
        optimizer = bnb.optim.PagedAdamW8bit if h.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return optimizer(groups, lr=h.learning_rate, betas=tuple(h.adam_betas), eps=h.adam_epsilon)
    fused = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" and not config.model.load_in_4bit
    return torch.optim.AdamW(groups, lr=h.learning_rate, betas=tuple(h.adam_betas), eps=h.adam_epsilon,
                             fused=fused or None)


def build_scheduler(optimizer, config: JobConfig, total_steps: int):
    """Linear warm-up, then cosine to 0, linear to 0 or constant: the same factors as transformers'
    `cosine`, `linear` and `constant_with_warmup` schedules, without importing its trainer stack."""
    h = config.hyperparams
    warmup, decay = h.warmup_steps, max(1, total_steps - h.warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / decay
        if h.lr_scheduler == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if h.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- the pieces of a step -----------------------------------------------------------------------

def count_tokens(window: list[dict]) -> tuple[int, int]:
    """(supervised tokens, non-padding input tokens) of a window on this process."""
    supervised = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
    inputs = 0
    for batch in window:
        real = batch.get(NUM_REAL_TOKENS, batch.get("attention_mask"))
        inputs += int(real.sum()) if real is not None else batch["input_ids"].numel()
    return supervised, inputs


def windows(loader, accelerator, accumulation: int, start_epoch: int, start_batch: int):
    """Yield (epoch, up to `accumulation` micro-batches) forever; a window never spans two epochs.

    Starts at `start_batch` of `start_epoch` without replaying the batches before it: the sampler's
    order depends only on (seed, epoch), and Accelerate skips batch indices, not data. A stream
    (`data.streaming`) has no epochs; the checkpointer restored its place.
    """
    if isinstance(loader, StreamLoader):
        yield from ((0, window) for window in loader.windows(accumulation))
        return
    for epoch in itertools.count(start_epoch):
        epoch_loader = loader
        if epoch == start_epoch and start_batch:
            # The skipping loader is built from the current sampler state: set the epoch first, or with
            # several processes a mid-epoch resume skips into another epoch's order.
            loader.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, start_batch)
        epoch_loader.set_epoch(epoch)
        batches = iter(epoch_loader)
        while window := list(itertools.islice(batches, accumulation)):
            yield epoch, window


def set_gradient_sync(accelerator, is_last: bool) -> None:
    """Tell Accelerate whether this micro-batch ends the accumulation window.

    We take the whole window before the first backward (to count its tokens), so Accelerate cannot
    count batches itself; transformers' Trainer does the same through this private setter. While it
    is False, `clip_grad_norm_` and DeepSpeed's engine hold off; `tests/test_loop.py` pins what it
    does under the installed Accelerate.
    """
    accelerator.gradient_state._set_sync_gradients(is_last)


def evaluate(model, loader, accelerator, loss_head=None) -> float:
    """Token-weighted validation loss over all processes (padding rows Accelerate adds are dropped);
    for an MoE model that trains with its router auxiliary loss, plus its coefficient times the mean
    auxiliary loss of the batches, as in the training loss."""
    model.eval()
    aux_coef = router_aux_coef(accelerator.unwrap_model(model))
    loss_sum, num_tokens = 0.0, 0
    aux_sums = torch.zeros(2, device=accelerator.device)  # auxiliary losses, batches that had one
    with torch.no_grad():
        for batch in loader:
            losses = summed_token_loss(model, batch, loss_head)
            row_losses, row_tokens = accelerator.gather_for_metrics((losses[0], losses[1]))
            loss_sum += float(row_losses.sum())
            num_tokens += int(row_tokens.sum())
            if aux_coef is not None and losses.aux_loss is not None:
                aux_sums += torch.stack([losses.aux_loss.detach(), torch.ones_like(losses.aux_loss)])
    model.train()
    loss = loss_sum / max(num_tokens, 1)
    if aux_coef is not None:
        aux_sum, num_batches = accelerator.reduce(aux_sums, "sum").tolist()
        loss += aux_coef * aux_sum / max(num_batches, 1)
    return loss


@dataclass
class LogWindow:
    """Running sums of the optimizer steps since the last log line, for token-weighted metrics."""

    first_step: int
    started: float
    loss_sum: float = 0.0
    num_tokens: int = 0
    num_input_tokens: int = 0

    def add(self, loss: float, num_tokens: int, num_input_tokens: int) -> None:
        self.loss_sum += loss * num_tokens
        self.num_tokens += num_tokens
        self.num_input_tokens += num_input_tokens

    def loss(self) -> float | None:
        return self.loss_sum / self.num_tokens if self.num_tokens else None


# --- the run ------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything the loop works with, built by `setup`."""

    config: JobConfig
    accelerator: object
    tokenizer: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: object
    eval_loader: object | None
    checkpointer: Checkpointer
    progress: Progress
    total_steps: int
    run_dir: RunDir
    preview_prompt_ids: list
    num_parameters: int
    peak_flops: float | None
    summary: dict
    started: float
    loss_head: torch.nn.Module | None = None
    """The output layer when the loss is fused with it (`loop.loss`), else None."""
    final_loss: float | None = None
    eval_loss: float | None = None
    aux_loss: float | None = None
    """The router auxiliary loss of the last step (MoE models that train with it), else None."""


def train(config: JobConfig, *, status_writer=None, on_step=None) -> TrainingResult:
    """Train as configured on this process (one of many under a distributed launch).

    `status_writer(fields)` receives every status update and `on_step(run)` is called after every
    optimizer step: the hooks for tools (the benchmarks time steps with `on_step`).

    Raises `ConfigError` (and its subclasses for data, model and resume problems) before anything
    is written to `output_dir`; any failure after that returns `TrainingResult(success=False)`.
    """
    started = time.time()
    check_output_dir(config.output_path)  # first: an unusable folder is refused before anything loads
    done = completed_result(config.output_path, config.to_toml()) if config.output.resume == "auto" else None
    if done is not None:
        logger.info("%s holds this job's completed run (result.json); nothing to do. Set output.resume = "
                    "\"never\" and output.overwrite = true to train it again.", config.output_path)
        return done
    accelerator = build_accelerator(config)
    check_cluster(accelerator, config)  # every rank there, one output folder, links timed: loop/preflight.py
    run_dir = RunDir(config.output_path, is_main=accelerator.is_main_process)
    run = None
    # Installed from the start: a stop requested while loading is honoured at the first step (before
    # any training), and one during the final save lets the save finish (the run is then complete).
    with StopFlag() as stop:
        try:
            run = setup(config, accelerator, run_dir, status_writer, started)
            fit(run, stop, on_step)
            final_dir = save_final_model(accelerator, run.model, run.tokenizer, config.output_path, config=config)
            run.summary.update(final_model=str(final_dir), eval_loss=run.eval_loss)
            result = TrainingResult(success=True, final_loss=run.final_loss)
            run_dir.status.update(status="completed", current_step=run.progress.step, eta_sec=0.0)
        except ConfigError as error:  # exit 2; after setup only a streamed record can raise it
            if run is not None:
                run_dir.status.update(status="failed", error_message=str(error))
            run_dir.close()
            raise
        except Preempted as stopped:
            result = TrainingResult(success=False, error=f"preempted: {stopped}")
            run.summary["preempted"] = True
            run_dir.status.update(status="preempted", error_message=result.error)
        except Exception as error:  # a failed run is a result, not an exception (see the contract)
            rank = accelerator.process_index
            logger.error("rank %d failed: %s", rank, error, exc_info=not isinstance(error, NonFiniteError))
            result = TrainingResult(success=False, error=f"rank {rank}: {type(error).__name__}: {error}")
            run_dir.status.update(status="failed", error_message=result.error)
        except BaseException:  # Ctrl-C or SystemExit: say so in status.json, free the folder, re-raise
            run_dir.status.update(status="failed", error_message="interrupted")
            run_dir.close()
            raise
        finally:
            if config.environment.report_to and run is not None:
                accelerator.end_training()
    result = finish(accelerator, run, run_dir, result, started)
    run_dir.close()
    if accelerator.num_processes == 1 and not torch.distributed.is_initialized():
        _forget_accelerator_state()  # leave no precision behind for the next Accelerator of this process
    return result


def setup(config: JobConfig, accelerator, run_dir: RunDir, status_writer, started: float) -> Run:
    """Build data, model and optimizer, restore a checkpoint, then own the output folder."""
    from accelerate.utils import set_seed

    h = config.hyperparams
    set_seed(h.seed)  # before the model and the data loader are built, so every rank agrees
    tokenizer = load_tokenizer(config)
    streaming = config.data.streaming  # read and tokenized while training: loop/data/streaming.py
    data = build_stream(config, tokenizer) if streaming else \
        build_datasets(config, tokenizer, main_process_first=accelerator.main_process_first)
    model = build_model(config, tokenizer)
    identity = check_identity(config, model, tokenizer, recorded=run_dir.recorded_identity)  # the [locked] guard
    register_checkpoint_hooks(accelerator)  # 4-bit bases are rebuilt on load, not saved
    if streaming:  # every process reads the whole stream and keeps its share of the batches
        train_loader = build_stream_loader(data, config, tokenizer, rank=accelerator.process_index,
                                           world_size=accelerator.num_processes, device=accelerator.device)
    else:
        train_loader = build_dataloader(data.train, config, tokenizer, shuffle=config.data.shuffle,
                                        batch_size=h.batch_size)
    eval_loader = None
    if data.validation is not None:
        eval_loader = build_dataloader(data.validation, config, tokenizer, shuffle=False, batch_size=h.batch_size)
    optimizer = build_optimizer(model, config)
    num_trainable, num_parameters = count_parameters(model)  # 4-bit weights as values, before ZeRO-3 shards
    num_train_rows = 0 if streaming else len(data.train)  # a stream's length is unknown: max_steps decides
    total_steps = config.num_optimizer_steps(num_train_rows, accelerator.num_processes)
    if streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # Built on the prepared optimizer (ZeRO-3 regroups the parameters it was given) and stepped by
    # us once per optimizer step; its state is saved as JSON in every checkpoint's progress.json.
    scheduler = build_scheduler(optimizer, config, total_steps)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    loss_head, loss_reason = choose_loss_head(model, config, accelerator)

    shape = RunShape(batch_size=h.batch_size, gradient_accumulation=h.gradient_accumulation,
                     world_size=accelerator.num_processes, num_train_examples=num_train_rows, seed=h.seed)
    checkpointer = Checkpointer(accelerator, config.output_path, save_steps=h.save_steps,
                                save_total_limit=h.save_total_limit, shape=shape, scheduler=scheduler,
                                settings=resume_settings(config), data_digest=data.digest,
                                stream=train_loader if streaming else None)
    resume_from, progress = checkpointer.restore(config, run_dir.recorded_run_id, total_steps)
    prompt_ids = preview_prompts(config, data.validation, tokenizer) if config.monitoring.preview_steps else []

    # Everything above may refuse the job; only from here on is output_dir written.
    if not resume_from:
        checkpointer.run_id = new_run_id()
    run_dir.open(job_toml=config.to_toml(), identity=identity, run_id=checkpointer.run_id,
                 keep_until_step=progress.step if resume_from else None, with_previews=bool(prompt_ids),
                 status_forward=getattr(status_writer, "write", status_writer),
                 manifest=build_manifest(config, tokenizer=tokenizer, data=data, world_size=accelerator.num_processes,
                                         run_id=checkpointer.run_id, resumed_from_step=progress.step if resume_from
                                         else None) if accelerator.is_main_process else None)
    checkpointer.remove_incomplete(keep_other_runs=resume_from is not None)
    if checkpointer.resume_changes:
        run_dir.metrics.write({"step": progress.step, "resume_changes": {
            key: {"checkpoint": old, "now": new} for key, (old, new) in checkpointer.resume_changes.items()}})
    run = Run(
        config=config, accelerator=accelerator, tokenizer=tokenizer, model=model, optimizer=optimizer,
        scheduler=scheduler, train_loader=train_loader, eval_loader=eval_loader, checkpointer=checkpointer,
        progress=progress, total_steps=total_steps, run_dir=run_dir, preview_prompt_ids=prompt_ids,
        num_parameters=num_parameters, peak_flops=device_peak_flops(), started=started, loss_head=loss_head,
        summary={"world_size": accelerator.num_processes, "num_train_examples": None if streaming else num_train_rows,
                 "num_parameters": num_parameters, "num_trainable_parameters": num_trainable,
                 "data": data.report.to_dict(), "resumed_from": str(resume_from) if resume_from else None,
                 "loss": "fused" if loss_head is not None else "logits"},
    )
    run_dir.status.update(status="running", current_step=progress.step, total_steps=total_steps, error_message=None)
    logger.info("%s on %d process(es), device %s, mixed precision %s, %d optimizer steps",
                accelerator.distributed_type.value, accelerator.num_processes, accelerator.device,
                accelerator.mixed_precision, total_steps)
    logger.info("loss: %s path (%s)", run.summary["loss"], loss_reason)
    if resume_from:
        logger.info("resuming from %s at step %d", resume_from, progress.step)
    if config.monitoring.preview_steps and not prompt_ids:
        logger.warning("monitoring.preview_steps is set but there are no prompts: set monitoring.preview_prompts "
                       "or give validation data")
    if config.environment.report_to:
        accelerator.init_trackers("trainer-engine", config=_flat_config(config))
    return run


def fit(run: Run, stop: StopFlag, on_step=None) -> None:
    """Run optimizer steps until `total_steps`; `run.final_loss` and `run.eval_loss` hold the last values.

    `on_step(run)`, if given, is called after every optimizer step (the benchmarks time steps with it).
    """
    config, accelerator, progress = run.config, run.accelerator, run.progress
    h = config.hyperparams
    steps = windows(run.train_loader, accelerator, h.gradient_accumulation, progress.epoch, progress.batches_in_epoch)
    bar = _progress_bar(accelerator, run.total_steps, progress.step)
    logged = LogWindow(progress.step, time.time())
    run.model.train()

    while progress.step < run.total_steps:
        # 1. Take the whole accumulation window first, so its supervised tokens can be counted on
        #    every process before any backward pass. The same all-reduce shares a stop request.
        epoch, window = next(steps)
        num_tokens, num_input_tokens = count_tokens(window)
        shared = torch.tensor([num_tokens, num_input_tokens, int(stop.is_set)], device=accelerator.device)
        global_tokens, global_input_tokens, num_stopping = (int(x) for x in accelerator.reduce(shared, "sum"))
        if num_stopping:
            _save_and_stop(run, stop)
        if epoch != progress.epoch:
            progress.epoch, progress.batches_in_epoch = epoch, 0

        # 2. Forward/backward per micro-batch, clip, refuse non-finite values, step.
        loss, grad_norm = train_step(run, window, global_tokens)

        progress.step += 1
        progress.batches_in_epoch += len(window)
        progress.num_tokens += global_tokens
        progress.num_input_tokens += global_input_tokens
        logged.add(loss, global_tokens, global_input_tokens)
        is_last_step = progress.step == run.total_steps

        # 3. Log, evaluate, preview, save.
        if progress.step % config.environment.logging_steps == 0 or is_last_step:
            log_step(run, logged, grad_norm, bar)
            logged = LogWindow(progress.step, time.time())
        if run.eval_loader is not None and (is_last_step or (h.eval_steps and progress.step % h.eval_steps == 0)):
            evaluate_step(run)
        if run.preview_prompt_ids and progress.step % max(config.monitoring.preview_steps, 1) == 0:
            preview_step(run)
        run.checkpointer.maybe_save(progress)
        if on_step is not None:
            on_step(run)

    if bar is not None:
        bar.close()


def train_step(run: Run, window: list[dict], global_tokens: int) -> tuple[float, float]:
    """Forward and backward every micro-batch of the window, clip and step; returns (loss, grad norm).

    The step's loss is sum(token losses over the window and all processes) / global_tokens.
    Accelerate divides each backward by the accumulation steps and DDP averages gradients over
    processes, so scaling each micro-batch's summed loss by accumulation * world_size / global_tokens
    leaves exactly that token mean.

    An MoE model whose config asks for router logits adds coef * (mean of its router auxiliary loss
    over the micro-batches of the window on all processes): the aux loss is already a mean per
    forward, so each micro-batch's is scaled by accumulation / micro-batches in the window (every
    process takes as many), which the same two divisions turn into that mean.
    """
    accelerator, model, h = run.accelerator, run.model, run.config.hyperparams
    scale = h.gradient_accumulation * accelerator.num_processes / max(global_tokens, 1)
    aux_coef = router_aux_coef(accelerator.unwrap_model(model))
    aux_scale = h.gradient_accumulation / len(window)
    sums = torch.zeros(3, device=accelerator.device)  # token losses, auxiliary losses, micro-batches with one
    for index, batch in enumerate(window):
        is_last = index == len(window) - 1
        set_gradient_sync(accelerator, is_last)  # gradients are all-reduced on the window's last micro-batch
        with contextlib.nullcontext() if is_last else accelerator.no_sync(model):
            losses = summed_token_loss(model, batch, run.loss_head)
            micro_loss = losses[0].sum()
            aux = losses.aux_loss if aux_coef is not None else None
            objective = micro_loss * scale
            if aux is not None:
                objective = objective + aux_coef * aux_scale * aux
            accelerator.backward(objective)
        if aux is None:
            sums[0] += micro_loss.detach()
        else:
            sums += torch.stack([micro_loss.detach(), aux.detach(), torch.ones_like(aux)])
    token_sum, aux_sum, num_aux = accelerator.reduce(sums, "sum").tolist()
    loss = token_sum / max(global_tokens, 1)
    run.aux_loss = aux_sum / num_aux if num_aux else None
    if run.aux_loss is not None:
        loss += aux_coef * run.aux_loss

    grad_norm = accelerator.clip_grad_norm_(model.parameters(), h.max_grad_norm or float("inf"))
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    if not math.isfinite(loss) or (not math.isfinite(grad_norm) and h.fp_precision != "fp16"):
        # DeepSpeed steps inside the last backward, so there the bad step is applied but never saved.
        applied = ("DeepSpeed applied the step inside backward; no checkpoint holds it"
                   if accelerator.distributed_type == "DEEPSPEED" else "the step was not applied")
        raise NonFiniteError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step "
                             f"{run.progress.step + 1}: loss={loss}, grad_norm={grad_norm}; {applied}. "
                             "Lower hyperparams.learning_rate or check the data.")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def log_step(run: Run, logged: LogWindow, grad_norm: float, bar) -> None:
    """One metrics record, tracker values, status.json and the progress line for the steps in `logged`."""
    progress = run.progress
    run.final_loss = logged.loss()
    record = _train_record(run, logged, grad_norm)
    run.run_dir.metrics.write(record)
    run.accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=progress.step)
    eta = (run.total_steps - progress.step) * (time.time() - logged.started) / max(progress.step - logged.first_step, 1)
    run.run_dir.status.update(current_step=progress.step, epoch=record["epoch"], loss=run.final_loss,
                              learning_rate=record["learning_rate"], tokens_per_sec=record["tokens_per_sec"],
                              eta_sec=eta)
    _print_progress(bar, run.accelerator, record, eta)


def evaluate_step(run: Run) -> None:
    run.eval_loss = evaluate(run.model, run.eval_loader, run.accelerator, run.loss_head)
    run.run_dir.metrics.write({"step": run.progress.step, "eval_loss": run.eval_loss})
    run.accelerator.log({"eval/loss": run.eval_loss}, step=run.progress.step)
    run.run_dir.status.update(validation_loss=run.eval_loss)


def preview_step(run: Run) -> None:
    monitoring = run.config.monitoring
    samples = generate_previews(run.model, run.tokenizer, run.preview_prompt_ids, monitoring.preview_max_new_tokens,
                                run.accelerator)
    if samples:  # [] on the processes that did not generate
        run.run_dir.previews.write({"step": run.progress.step, "samples": samples})
        run.run_dir.status.update(preview={"step": run.progress.step, "samples": samples})


def _save_and_stop(run: Run, stop: StopFlag) -> None:
    """Every rank comes here at the same step; the message names what asked for the stop, and on which
    rank when it was not this one (a scheduler may signal one process only)."""
    from accelerate.utils import gather_object

    checkpointer, progress = run.checkpointer, run.progress
    asked = gather_object([stop.signal_name])  # a collective, once per run: every rank is here
    cause = stop.signal_name or next((f"{name} on rank {rank}" for rank, name in enumerate(asked) if name),
                                     "a signal on another rank")
    if progress.step == 0:  # asked to stop while loading: nothing trained, nothing to save
        raise Preempted(f"stopped by {cause} before the first step; rerun the same command to start")
    path = checkpointer.save(progress) if checkpointer.last_step != progress.step else checkpointer.last_path
    raise Preempted(f"stopped by {cause} at step {progress.step}; checkpoint {path}; rerun the same command "
                    "to resume")


def finish(accelerator, run: Run | None, run_dir: RunDir, result: TrainingResult, started: float) -> TrainingResult:
    """Fill in the result's totals; the main process writes result.json into the folder it owns."""
    elapsed = time.time() - started
    progress = run.progress if run else Progress()
    summary = run.summary if run else {"world_size": accelerator.num_processes}
    result.global_step = progress.step
    result.runtime_sec = elapsed
    last = run.checkpointer.last_path if run else None
    result.last_checkpoint_path = str(last) if last else None
    result.summary = {"train_loss": result.final_loss, "eval_loss": None, **summary,
                      "num_train_tokens": progress.num_tokens, "num_input_tokens": progress.num_input_tokens,
                      "tokens_per_sec": progress.num_tokens / elapsed if elapsed else 0.0,
                      "input_tokens_per_sec": progress.num_input_tokens / elapsed if elapsed else 0.0,
                      "mfu": mfu(run.num_parameters, progress.num_input_tokens / elapsed, accelerator.num_processes,
                                 run.peak_flops) if run and elapsed else None,
                      "peak_memory_bytes": peak_memory_bytes(),
                      "total_steps": run.total_steps if run else None}
    preempted = bool(run and run.summary.get("preempted"))
    if _should_write_result(accelerator, result, run_dir.path, preempted):
        run_dir.write_result(result)
    return result


def _should_write_result(accelerator, result: TrainingResult, output_dir: Path, preempted: bool) -> bool:
    """The main process writes the result; a rank that failed on its own writes its failure too.

    A stop is shared by all ranks at the same step, so only the main process writes it. A rank
    whose failure is only the echo of another rank's (a broken collective) leaves an existing
    failure result alone, so result.json names the rank that failed first.
    """
    if result.success or preempted:
        return accelerator.is_main_process
    echo = any(word in (result.error or "") for word in ("Connection closed", "Connection reset", "Gloo", "NCCL",
                                                         "DistBackendError", "timed out"))
    if echo and (output_dir / "result.json").exists():
        try:
            return TrainingResult.read(output_dir / "result.json").success
        except (OSError, ValueError):
            return True
    return accelerator.is_main_process or not echo


def _train_record(run: Run, logged: LogWindow, grad_norm: float) -> dict:
    progress, now = run.progress, time.time()
    seconds = max(now - logged.started, 1e-9)
    record = {
        "step": progress.step,
        "epoch": None if isinstance(run.train_loader, StreamLoader)  # a stream has no epochs
        else progress.epoch + progress.batches_in_epoch / max(len(run.train_loader), 1),
        "loss": logged.loss(), "learning_rate": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
        "num_tokens": progress.num_tokens, "tokens_per_sec": logged.num_tokens / seconds,
        "input_tokens_per_sec": logged.num_input_tokens / seconds, "elapsed_sec": now - run.started,
        "peak_memory_bytes": peak_memory_bytes(),
    }
    utilisation = mfu(run.num_parameters, record["input_tokens_per_sec"], run.accelerator.num_processes,
                      run.peak_flops)
    if utilisation is not None:
        record["mfu"] = utilisation
    if run.aux_loss is not None:
        record["aux_loss"] = run.aux_loss  # of the last step, like grad_norm; `loss` holds coef x it
    return record


def _progress_bar(accelerator, total_steps: int, initial: int):
    """tqdm on the main process when stderr is a terminal; plain log lines otherwise."""
    if not accelerator.is_main_process or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, initial=initial, desc="training", unit="step", dynamic_ncols=True)


def _print_progress(bar, accelerator, record: dict, eta: float) -> None:
    if bar is not None:
        bar.n = record["step"]
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
        bar.refresh()
    elif accelerator.is_main_process:
        logger.info("step %d  loss %.4f  lr %.3g  grad_norm %.3f  tokens/s %.0f  eta %.0fs", record["step"],
                    record["loss"], record["learning_rate"], record["grad_norm"], record["tokens_per_sec"], eta)


def _flat_config(config: JobConfig) -> dict:
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
