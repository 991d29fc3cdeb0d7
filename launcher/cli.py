"""Command line: `python -m launcher {run,validate,check,status,report,diff,demo,reference} ...`.

Exit codes: 0 success; 1 the training ran and failed (result.json says why); 2 the job was refused
before training (bad config, missing file, bad data); 3 the run was stopped by SIGTERM/SIGUSR1 after
saving a checkpoint (rerun the same command to resume). A refused job prints one message, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from launcher.config import ConfigError, load_config, parse_override

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
REPO_ROOT = Path(__file__).resolve().parent.parent


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors are refusals too
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m launcher", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Exit codes: 0 success, 1 training failed, 2 job refused before training, "
                            "3 stopped by a signal after a checkpoint (rerun to resume).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def job_command(name: str, help_text: str):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("job", help="the job file (TOML)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a job key, typed like TOML: --set hyperparams.learning_rate=1e-4 (repeatable)")
        return sub

    job_command("run", "Train the job (starts `accelerate launch` itself when [launch] asks for several processes).")
    job_command("validate", "Check config, model, tokenizer, data and masks without training; print a data report.")
    check = job_command("check", "Short proofs on the job's own model and data, in a scratch folder: masks, "
                                 "accumulation, resume, processes, determinism. Exit 0 only if all pass.")
    check.add_argument("--quick", action="store_true", help="masks only (no training)")
    check.add_argument("--scratch", metavar="DIR", help="keep the proof runs in DIR (default: a temporary folder, "
                                                     "removed afterwards); compare two of them with `diff`")
    job_command("prepare", "Tokenize, split and pack the data into the cache ahead of training.")
    plan = job_command("plan", "Predicted peak memory per device, by term, and the micro-batch that fits.")
    plan.add_argument("--gpus", type=int, default=None, metavar="N", help="devices to plan for (default: the job's)")
    plan.add_argument("--gpu-memory", default=None, metavar="SIZE", help="memory per device, e.g. 80GB")
    demo = commands.add_parser("demo", help="Build the tiny offline model and train the example job on it.")
    demo.add_argument("--model-dir", default=str(REPO_ROOT / "examples" / "tiny-model"))
    demo.add_argument("--job", default=str(REPO_ROOT / "examples" / "demo_job.toml"))
    demo.add_argument("--build-only", action="store_true", help="only build the tiny model")
    reference = commands.add_parser("reference", help="Print the job-file reference (markdown) from the config "
                                                      "docstrings.")
    reference.add_argument("--update", metavar="MARKDOWN", help="replace the reference block in this Markdown file (docs/reference.md)")
    status = commands.add_parser("status", help="Summarise a run: state, step, loss, ETA, last checkpoint, samples.")
    status.add_argument("output_dir", help="the run's output folder (or its job file)")
    report = commands.add_parser("report", help="Write report.md and loss.png into a run's output folder.")
    report.add_argument("output_dir", help="the run's output folder (or its job file)")
    diff = commands.add_parser("diff", help="What differs between two runs' jobs and manifests, and where their "
                                            "losses first differ.")
    diff.add_argument("run_a", help="the first run's output folder (or its job file)")
    diff.add_argument("run_b", help="the second run's output folder (or its job file)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "reference":
            return _reference(args.update)
        if args.command == "demo":
            return _demo(args)
        if args.command in ("status", "report"):
            from launcher.report import main_report, main_status

            return (main_status if args.command == "status" else main_report)(args.output_dir)
        if args.command == "diff":
            from launcher.diff import main_diff

            return main_diff(args.run_a, args.run_b)
        overrides = dict(parse_override(item) for item in args.overrides)
        if args.command == "plan":
            from launcher.plan import main_plan

            return main_plan(args.job, args.gpus, args.gpu_memory, overrides)
        if args.command == "prepare":
            from launcher.prepare import main_prepare

            return main_prepare(args.job, overrides)
        config = load_config(args.job, overrides=overrides)
        if args.command == "validate":
            return _validate(config)
        if args.command == "check":
            return _check(args.job, overrides, args.quick, args.scratch)
        return _run(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:  # Ctrl-C: status.json says "interrupted"; the newest checkpoint resumes
        print("\ninterrupted; rerun the same command to resume from the newest checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug or an environment problem outside the training itself
        if os.environ.get("TRAINER_ENGINE_DEBUG"):
            raise
        print(f"error: {type(error).__name__}: {error}\n(set TRAINER_ENGINE_DEBUG=1 to see the traceback)",
              file=sys.stderr)
        return EXIT_FAILED


def _run(config) -> int:
    from launcher.run import HANDOFF_ENV, run_job
    from loop.preemption import EXIT_PREEMPTED

    result = run_job(config)
    launched_by_us = HANDOFF_ENV in os.environ  # the launching process prints the result
    if _is_main_process() and not launched_by_us:
        print(json.dumps({k: v for k, v in json.loads(result.to_json()).items() if k != "summary"}, indent=2))
        if not result.success:
            print(f"error: training failed: {result.error}", file=sys.stderr)
    if result.success:
        return EXIT_OK
    return EXIT_PREEMPTED if result.summary.get("preempted") else EXIT_FAILED


REFERENCE_START, REFERENCE_END = "<!-- reference:start -->", "<!-- reference:end -->"


def _reference(readme: str | None) -> int:
    from launcher.config import reference_markdown

    if readme is None:
        print(reference_markdown())
        return EXIT_OK
    text = Path(readme).read_text(encoding="utf-8")
    if REFERENCE_START not in text or REFERENCE_END not in text:
        raise ConfigError(f"{readme}: no {REFERENCE_START} ... {REFERENCE_END} block to update")
    head, rest = text.split(REFERENCE_START, 1)
    tail = rest.split(REFERENCE_END, 1)[1]
    Path(readme).write_text(f"{head}{REFERENCE_START}\n{reference_markdown()}\n{REFERENCE_END}{tail}", encoding="utf-8")
    print(f"updated the job-file reference in {readme}")
    return EXIT_OK


def _validate(config) -> int:
    from launcher.validate import validate_job

    print(validate_job(config))
    return EXIT_OK


def _check(job: str, overrides: dict, quick: bool, scratch: str | None) -> int:
    from launcher.check import check_job, format_report

    report = check_job(job, overrides, quick=quick, scratch_dir=scratch, log=print)
    print(format_report(report))
    return EXIT_OK if report.passed else EXIT_FAILED


def _demo(args) -> int:
    from launcher.demo import build_tiny_model, corpus_from_jsonl

    data = REPO_ROOT / "examples" / "data" / "chat.jsonl"
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, extra_text=corpus_from_jsonl(data) if data.exists() else "")
        print(f"built the tiny model in {model_dir}")
    if args.build_only:
        return EXIT_OK
    config = load_config(args.job)
    print(f"training {args.job} ...")
    return _run(config)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "accelerate", "datasets", "DeepSpeed", "torch.distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Harmless on every run: tied embeddings saved once, and bitsandbytes' optional CPU kernels.
    for chatty in ("accelerate.utils.other", "bitsandbytes"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":
    sys.exit(main())
