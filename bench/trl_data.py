"""Against TRL's dataset preparation: `SFTTrainer`'s tokenize + BFD packing and our `build_datasets`
on the same JSONL chat records: CPU time per record and peak resident memory.

    python -m bench.trl_data            # 100k records (about 150 MB), 2 rounds: about 30 minutes on 2 shared cores
    python -m bench.trl_data --quick    # 20k records (about 31 MB), 2 rounds: 5-8 minutes

Needs `pip install trl`; reports itself skipped when it is not installed.

The records are `bench.data_scale`'s (one-turn chat, about 1.5 KB each, pseudo-words of the bench
lexicon), and the tokenizer is the bench tokenizer (byte-level BPE, vocabulary 2,048) with the
ChatML template that has `{% generation %}` markers, so both sides render the same tokens and
train exactly the assistant tokens (TRL through `assistant_only_loss=True`, ours through the
default profile). Each preparation runs in a fresh process (`--child`), the two sides alternating
in rounds, rotating which goes first; each starts with an empty cache and one process
(`data.num_proc = 1`; TRL's `dataset_num_proc = None`):

- ours: `loop.data.build_datasets` with `data.packing = true`, `data.max_length = 2048` (as
  `bench.data_scale`): reading the JSONL, rendering and tokenizing, best-fit-decreasing packing,
  writing the cache;
- TRL: what `SFTTrainer.__init__` does to a training set, timed alone: `datasets.load_dataset("json")`
  of the same file (into an empty cache folder), then `SFTTrainer._prepare_dataset` with
  `SFTConfig(packing=True, packing_strategy="bfd", max_length=2048, assistant_only_loss=True)` --
  tokenizing with the chat template and its assistant masks, building the labels, and
  `trl.data_utils.pack_dataset(strategy="bfd")`. The trainer is built beforehand (bench model,
  random weights) on two records, so the timed part is the preparation only.

Each child reports CPU time (the figure: other processes share the cores), wall time, peak resident
memory (`ru_maxrss`) and its value just before preparing (imports, tokenizer; TRL's also holds
torch and the 4.5M-parameter model), and, from the prepared rows, the tokens, the tokens that carry
loss and the packed rows -- to show both prepared the same thing. TRL's BFD packs each `map` batch
of 1,000 examples on its own, ours the whole set at once, so the packed rows can differ slightly.

No target: the issue asks for the side-by-side. Its neighbouring target is ours <= 1 GB peak at
200k records (`bench.data_scale`).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

from bench.common import (MODEL_SHAPE, PYTHON, VOCAB_SIZE, Row, TextSource, alternate, log, main_for, median,
                          run_command, spread, workspace)

NAME = "trl_data"
BENCH = "TRL data preparation"
MAX_LENGTH = 2048
SETTINGS = {False: (100_000, 2), True: (20_000, 2)}  # records, rounds


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def build_model_folder(folder: Path) -> Path:
    """The bench model and tokenizer (`bench.common.bench_model`), with the generation-marker ChatML template."""
    from launcher.demo import build_model, build_tokenizer
    from loop.data.templates import CHATML_GENERATION_TEMPLATE

    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer(folder, vocab_size=VOCAB_SIZE, chat_template=CHATML_GENERATION_TEMPLATE,
                                    extra_text=TextSource(seed=1).text(60_000))
        build_model(folder, tokenizer, **MODEL_SHAPE)
    return folder


# --- one preparation, in a fresh process ------------------------------------------------------------

def _counts(dataset) -> dict:
    """Rows, tokens and tokens with loss (labels != -100) of prepared rows, read from their Arrow columns."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
    labels = pc.list_flatten(table.column("labels"))
    trained = int(pc.sum(pc.not_equal(labels, -100).cast("int64")).as_py() or 0)
    return {"rows": len(dataset), "tokens": tokens, "trained": trained}


def _measure(prepare) -> dict:
    from bench.data_scale import PeakMemory

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakMemory() as peak:
        start, cpu = time.perf_counter(), time.process_time()
        result = prepare()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "maxrss_before": before,
            "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "children_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "peak_anon": peak.anon, "peak_file": peak.file, "result": result}


def child_ours(data: str, model: str, folder: str, out: str) -> None:
    import datasets

    from launcher.config import load_config
    from loop.data import build_datasets, load_tokenizer
    from tests.helpers import write_job

    datasets.disable_progress_bars()
    job = write_job(Path(folder), model, **{
        "data.dataset_path": data, "data.cache_dir": str(Path(folder) / "cache"), "data.packing": True,
        "data.max_length": MAX_LENGTH, "data.num_proc": 1})
    config = load_config(job)
    tokenizer = load_tokenizer(config)
    measured = _measure(lambda: build_datasets(config, tokenizer))
    prepared = measured.pop("result")
    counts = _counts(prepared.train)
    measured.update(counts, records=prepared.report.num_read, report_tokens=prepared.report.num_tokens,
                    report_trained=prepared.report.num_trained_tokens, truncated=prepared.report.num_truncated,
                    validation_rows=len(prepared.validation) if prepared.validation is not None else 0)
    Path(out).write_text(json.dumps(measured))


def child_trl(data: str, model: str, folder: str, out: str) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model)
    network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(Path(folder) / "out"), packing=True, packing_strategy="bfd", max_length=MAX_LENGTH,
        assistant_only_loss=True, dataset_num_proc=None, per_device_train_batch_size=1, use_cpu=True,
        bf16=False, fp16=False, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        seed=42)
    with open(data, encoding="utf-8") as handle:
        first = [json.loads(next(handle)) for _ in range(2)]
    trainer = SFTTrainer(model=network, args=config, train_dataset=datasets.Dataset.from_list(first),
                         processing_class=tokenizer)
    cache = str(Path(folder) / "hf-cache")

    def prepare():
        dataset = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
        records = len(dataset)
        return records, trainer._prepare_dataset(dataset, tokenizer, config, config.packing, None, "train")

    measured = _measure(prepare)
    records, prepared = measured.pop("result")
    measured.update(_counts(prepared), records=records)
    Path(out).write_text(json.dumps(measured))


def measure(side: str, data: Path, model: Path, label: str) -> dict:
    folder = workspace() / NAME / label
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / "result.json"
    run_command([PYTHON, "-m", "bench.trl_data", f"--child-{side}", str(data), str(model), str(folder), str(result)],
                folder / "child.log", timeout=3600)
    return json.loads(result.read_text())


# --- the rows ---------------------------------------------------------------------------------------

def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.0f} MB"


def run(quick: bool = False) -> list[Row]:
    if not trl_available():
        log(f"{NAME}: trl is not installed (pip install trl); skipped")
        return [Row(bench=BENCH, figure="skipped: trl is not installed", value="n/a")]
    from bench.data_scale import write_records

    count, rounds = SETTINGS[quick]
    model = build_model_folder(workspace() / NAME / "model")
    data = write_records(workspace() / "data" / f"chat-{count}.jsonl", count)
    log(f"{NAME}: {count:,} records ({data.stat().st_size / 1e6:.0f} MB), rows of up to {MAX_LENGTH} tokens; "
        f"{rounds} round(s), a fresh process per preparation")
    results = alternate(rounds, {
        "ours": lambda i: measure("ours", data, model, f"ours-{i}"),
        "TRL": lambda i: measure("trl", data, model, f"trl-{i}"),
    }, label=NAME)
    ours, trl = results["ours"], results["TRL"]
    cpu = [o["cpu_seconds"] / t["cpu_seconds"] for o, t in zip(ours, trl)]
    wall = [o["seconds"] / t["seconds"] for o, t in zip(ours, trl)]
    peak = [o["maxrss"] / t["maxrss"] for o, t in zip(ours, trl)]
    o, t = ours[0], trl[0]

    def per_record(side: list[dict]) -> str:
        return f"{median([r['cpu_seconds'] / r['records'] for r in side]) * 1e6:,.0f} us"

    same = all(r["tokens"] == o["tokens"] and r["trained"] == o["trained"] for r in ours + trl)
    return [
        Row(bench=BENCH, figure=f"CPU time per record, ours (`build_datasets`) / TRL `SFTTrainer` preparation "
                                f"(tokenize + BFD packing), {count:,} records",
            value=f"{median(cpu):.2f}x", spread=spread(cpu, "{:.2f}", "x"),
            detail=f"ours {per_record(ours)}/record CPU ({median([r['cpu_seconds'] for r in ours]):.1f} s CPU, "
                   f"{median([r['seconds'] for r in ours]):.1f} s wall), TRL {per_record(trl)}/record "
                   f"({median([r['cpu_seconds'] for r in trl]):.1f} s CPU, {median([r['seconds'] for r in trl]):.1f} s "
                   f"wall); wall-time ratio {median(wall):.2f}x",
            raw={"ours": ours, "TRL": trl}),
        Row(bench=BENCH, figure="peak resident memory of the preparing process, ours / TRL",
            value=f"{median(peak):.2f}x", spread=spread(peak, "{:.2f}", "x"),
            detail=f"ours {_mb(median([r['maxrss'] for r in ours]))} ({_mb(o['maxrss_before'])} before preparing, "
                   f"heap peak {_mb(o['peak_anon'])}), TRL {_mb(median([r['maxrss'] for r in trl]))} "
                   f"({_mb(t['maxrss_before'])} before preparing: torch, trl and the model too; heap peak "
                   f"{_mb(t['peak_anon'])})"),
        Row(bench=BENCH, figure="growth of peak resident memory while preparing: ours; TRL",
            value=f"+{_mb(median([r['maxrss'] - r['maxrss_before'] for r in ours]))}; "
                  f"+{_mb(median([r['maxrss'] - r['maxrss_before'] for r in trl]))}",
            detail="the peak above its value just before preparing (what the imports and tokenizer had already "
                   "reached); medians over rounds"),
        Row(bench=BENCH, figure="what each prepared: tokens, tokens with loss, packed rows (ours; TRL)",
            value="same tokens" if same else "DIFFERENT tokens",
            detail=f"ours {o['tokens']:,} tokens, {o['trained']:,} with loss, {o['rows']:,} rows of up to "
                   f"{MAX_LENGTH} ({o['tokens'] / (o['rows'] * MAX_LENGTH):.1%} filled); TRL {t['tokens']:,}, "
                   f"{t['trained']:,}, {t['rows']:,} rows ({t['tokens'] / (t['rows'] * MAX_LENGTH):.1%} filled; BFD "
                   f"per batch of 1,000 examples); {o['records']:,} records read by each"),
    ]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--child-ours", "--child-trl"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the rest comes from the parent's environment
        (child_ours if sys.argv[1] == "--child-ours" else child_trl)(*sys.argv[2:6])
    else:
        main_for(run)
