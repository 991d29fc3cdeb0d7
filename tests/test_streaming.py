"""Streaming (`data.streaming = true`): the same rows and weights as the cached path where the order
allows, exact resume from any place in any format, weighted mixes, several processes, bad records.

    .venv/bin/python -m pytest tests/test_streaming.py -q
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import (ROUNDING_SAFE_ADAM, assert_same_weights, chat_records, final_weights, read_metrics, small_job,
                     write_jsonl)
from launcher import run_job
from launcher.config import ConfigError, load_config
from loop.data import DataError, build_dataloader, build_datasets, load_tokenizer
from loop.data.sources import data_files
from loop.data.streaming import SourceReader, build_stream, build_stream_loader
from loop.train import train

STREAM = {"data.streaming": True, "data.stream_buffer": 5}
IN_ORDER = {"data.shuffle": False, **ROUNDING_SAFE_ADAM}


def loader_of(config, rank: int = 0, world_size: int = 1):
    tokenizer = load_tokenizer(config)
    return build_stream_loader(build_stream(config, tokenizer), config, tokenizer, rank=rank,
                               world_size=world_size, device="cpu")


def batches(loader, count: int) -> list[dict]:
    windows = loader.windows(1)
    return [next(windows)[0] for _ in range(count)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]) if isinstance(x[key], torch.Tensor) else x[key] == y[key], key


def write_parquet(path, records, row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def text_records(prefix: str, count: int) -> list[dict]:
    return [{"text": f"{prefix} {i}"} for i in range(count)]


# --- the job file --------------------------------------------------------------------------------

def test_streaming_needs_max_steps_and_refuses_what_needs_a_length(tmp_path, tiny_model_dir):
    job = small_job(tmp_path, tiny_model_dir, **STREAM, **{"hyperparams.max_steps": -1,
                                                           "monitoring.validation_split": 0.1})
    with pytest.raises(ConfigError) as raised:
        load_config(job)
    assert "hyperparams.max_steps" in str(raised.value) and "unknown length" in str(raised.value)
    assert "monitoring.validation_split" in str(raised.value)
    write_jsonl(tmp_path / "b.jsonl", chat_records(4))
    job = small_job(tmp_path, tiny_model_dir, **STREAM, **{
        "data.dataset_path": None, "data.sources": [{"path": "train.jsonl", "num_samples": 10}, {"path": "b.jsonl"}]})
    with pytest.raises(ConfigError, match=r"data.sources\[1\].num_samples"):
        load_config(job)


# --- places in every format ----------------------------------------------------------------------

def _format_files(tmp_path):
    """Each format with its traps: blank lines and a BOM, several shards, small row groups."""
    import datasets

    records = chat_records(23)
    folder = tmp_path / "shards"
    lines = [json.dumps(r) for r in records[:12]]
    (folder / "a.jsonl").parent.mkdir(parents=True)
    (folder / "a.jsonl").write_text("\ufeff" + "\n".join(lines[:5]) + "\n\n  \n" + "\n".join(lines[5:]) + "\n",
                                    encoding="utf-8")
    write_jsonl(folder / "b.jsonl", records[12:])
    write_parquet(tmp_path / "parquet" / "0.parquet", records[:10], row_group_size=3)
    write_parquet(tmp_path / "parquet" / "1.parquet", records[10:], row_group_size=4)
    (tmp_path / "array.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    return [str(folder), str(tmp_path / "parquet"), str(tmp_path / "array.json"), str(tmp_path / "saved")]


def _read(reader: SourceReader, count: int) -> list:
    out = []
    while len(out) < count:
        record = reader.next()
        out.append(None if record is None else (record[0], record[1], record[3],
                                                record[2] if isinstance(record[2], dict) else json.loads(record[2])))
    return out


def test_a_reader_restarted_from_its_state_reads_on_exactly_where_it_was(tmp_path):
    for path in _format_files(tmp_path):
        files = data_files(path, "data.dataset_path")
        whole = _read(SourceReader(files), 60)  # over two passes: each ends in one None
        assert whole.count(None) == 2 and whole[whole.index(None) + 1:whole.index(None) + 24] == whole[:23], path
        for stop in (0, 1, 4, 7, 11, 12, 22, 23, 24, 37):
            reader = SourceReader(files)
            _read(reader, stop)
            state = json.loads(json.dumps(reader.state_dict()))
            resumed = SourceReader(files)
            resumed.load_state_dict(state)
            assert _read(resumed, 60 - stop) == whole[stop:], (path, stop)


# --- the same rows as the cached path --------------------------------------------------------------

@pytest.mark.parametrize("packing", [False, True])
def test_a_stream_in_order_gives_the_cached_loaders_batches(tmp_path, tiny_model_dir, packing):
    records = chat_records(12)
    # One block holds the whole file, so packing sees what the cached path packs.
    config = load_config(small_job(tmp_path, tiny_model_dir, records, **IN_ORDER, **{
        "data.streaming": True, "data.stream_buffer": 12, "data.packing": packing, "data.max_length": 256}))
    cached = build_datasets(config, load_tokenizer(config)).train
    loader = build_dataloader(cached, config, load_tokenizer(config), shuffle=False)
    expected = list(loader)
    assert len(expected) == (len(cached) + 1) // 2 and (not packing or len(cached) < 12)
    assert_same_batches(batches(loader_of(config), len(expected)), expected)


def test_a_stream_trains_to_the_cached_weights_and_validation_loss(tmp_path, tiny_model_dir):
    # 12 examples, 2 x 2 per step: three steps are exactly one pass, as one epoch of the cached path.
    settings = {**IN_ORDER, "hyperparams.gradient_accumulation": 2, "hyperparams.max_steps": 3}
    cached = load_config(small_job(tmp_path / "cached", tiny_model_dir, chat_records(12),
                                   validation_records=chat_records(5, 100), **settings))
    streamed = load_config(small_job(tmp_path / "streamed", tiny_model_dir, chat_records(12),
                                     validation_records=chat_records(5, 100), **settings, **STREAM))
    a, b = train(cached), train(streamed)
    assert a.success and b.success, (a.error, b.error)
    assert b.summary["data"]["streaming"] and b.summary["data"]["num_validation_examples"] == 5
    assert a.summary["num_train_tokens"] == b.summary["num_train_tokens"]
    assert_same_weights(final_weights(cached.output_path), final_weights(streamed.output_path))
    assert b.summary["eval_loss"] == pytest.approx(a.summary["eval_loss"], rel=1e-5)


# --- exact resume --------------------------------------------------------------------------------

def test_resume_mid_block_ends_with_the_uninterrupted_weights_without_reading_from_the_start(
        tmp_path, tiny_model_dir, monkeypatch):
    import loop.data.prepare as prepare

    write_parquet(tmp_path / "b.parquet", chat_records(7, 100), row_group_size=2)
    # Two weighted sources, packing and shuffling in blocks of 5 records: step 3 ends mid-block, and the
    # sources are re-opened (10 and 7 records, about 40 read).
    job = small_job(tmp_path, tiny_model_dir, chat_records(10), **STREAM, **{
        "data.dataset_path": None, "data.packing": True, "data.max_length": 96,
        "data.sources": [{"path": "train.jsonl", "weight": 2.0}, {"path": "b.parquet", "weight": 1.0}],
        "hyperparams.gradient_accumulation": 2, "hyperparams.max_steps": 7, "hyperparams.save_steps": 3,
        "hyperparams.save_total_limit": 5})
    config = load_config(job)
    tokenized = []
    real_tokenize = prepare.tokenize_records

    def counting(records, *args, **kwargs):
        tokenized.append(len(records.lines))
        return real_tokenize(records, *args, **kwargs)

    monkeypatch.setattr(prepare, "tokenize_records", counting)
    first = train(config)
    assert first.success, first.error
    uninterrupted, num_tokenized = final_weights(config.output_path), sum(tokenized)
    assert num_tokenized > 17, "the sources were not re-opened"
    checkpoints = config.output_path / "checkpoints"
    saved = json.loads((checkpoints / "step_000003" / "progress.json").read_text())["stream"]
    assert 0 < saved["rows"]["taken"] < saved["rows"]["num_rows"], "step 3 should end inside a block"
    shutil.rmtree(checkpoints / "step_000006")
    shutil.rmtree(config.output_path / "final")
    (config.output_path / "result.json").unlink()

    tokenized.clear()
    resumed = train(config)
    assert resumed.success, resumed.error
    assert resumed.summary["resumed_from"].endswith("step_000003")
    assert_same_weights(uninterrupted, final_weights(config.output_path), rel=0.0)
    assert [r["step"] for r in read_metrics(config.output_path)] == list(range(1, 8))
    # Read again: the first records of each source (checked to give an example) and the block of step 3.
    probe = 2 * 16
    assert sum(tokenized) <= num_tokenized - saved["rows"]["block"] * 5 + probe


def test_a_window_taken_but_not_trained_is_not_saved_as_consumed(tmp_path, tiny_model_dir):
    config = load_config(small_job(tmp_path, tiny_model_dir, chat_records(9), **STREAM))
    loader = loader_of(config)
    windows = loader.windows(2)
    next(windows)
    untrained = next(windows)  # taken, then a stop is requested before its step
    state = json.loads(json.dumps(loader.state_dict(2)))
    again = loader_of(config)
    again.load_state_dict(state)
    assert_same_batches(next(again.windows(2)), untrained)


# --- the mix -------------------------------------------------------------------------------------

def test_weighted_sources_share_the_stream_by_weight_each_in_its_own_order(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "a.jsonl", text_records("alpha", 50))
    write_parquet(tmp_path / "b.parquet", text_records("beta", 30))
    config = load_config(small_job(tmp_path, tiny_model_dir, **{
        **STREAM, "data.dataset_path": None, "data.shuffle": False, "data.stream_buffer": 100,
        "profile.name": "text",
        "data.sources": [{"path": "a.jsonl", "weight": 3.0}, {"path": "b.parquet", "weight": 1.0}],
        "hyperparams.batch_size": 1}))
    tokenizer = load_tokenizer(config)
    texts = [tokenizer.decode(b["input_ids"][0], skip_special_tokens=True) for b in batches(loader_of(config), 800)]
    alpha = [t for t in texts if t.startswith("alpha")]
    assert len(alpha) / len(texts) == pytest.approx(0.75, abs=0.04)
    assert alpha[:60] == [f"alpha {i % 50}" for i in range(60)]  # in file order, re-opened at the end
    beta = [t for t in texts if t.startswith("beta")]
    assert beta[:40] == [f"beta {i % 30}" for i in range(40)]


def test_unweighted_sources_are_read_one_after_another(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "a.jsonl", text_records("alpha", 3))
    write_jsonl(tmp_path / "b.jsonl", text_records("beta", 2))
    config = load_config(small_job(tmp_path, tiny_model_dir, **STREAM, **{
        "data.dataset_path": None, "data.shuffle": False, "profile.name": "text",
        "data.sources": [{"path": "a.jsonl"}, {"path": "b.jsonl"}], "hyperparams.batch_size": 1}))
    tokenizer = load_tokenizer(config)
    texts = [tokenizer.decode(b["input_ids"][0], skip_special_tokens=True) for b in batches(loader_of(config), 8)]
    assert texts == ["alpha 0", "alpha 1", "alpha 2", "beta 0", "beta 1", "alpha 0", "alpha 1", "alpha 2"]


# --- several processes ---------------------------------------------------------------------------

def test_each_process_keeps_its_own_batches(tmp_path, tiny_model_dir):
    config = load_config(small_job(tmp_path, tiny_model_dir, chat_records(12), **STREAM, **IN_ORDER))
    one = batches(loader_of(config), 6)
    ranks = [batches(loader_of(config, rank, 2), 3) for rank in (0, 1)]
    assert_same_batches([b for pair in zip(*ranks) for b in pair], one)


@pytest.mark.slow
@pytest.mark.parametrize("launch", [{}, {"launch.accelerate_config": "deepspeed_zero2"}], ids=["ddp", "zero2"])
def test_two_processes_give_the_weights_of_one_with_twice_the_batch(tmp_path, tiny_model_dir, launch):
    # Under DeepSpeed the stream is not a prepared loader, so the engine's micro-batch comes from the job.
    settings = {**STREAM, **IN_ORDER, "hyperparams.max_steps": 3}
    one = load_config(small_job(tmp_path / "one", tiny_model_dir, chat_records(16), **settings,
                                **{"hyperparams.batch_size": 4}))
    two = load_config(small_job(tmp_path / "two", tiny_model_dir, chat_records(16), **settings,
                                **{"hyperparams.batch_size": 2, "launch.num_processes": 2, **launch}))
    result = run_job(two)
    assert result.success, result.error
    assert result.summary["world_size"] == 2
    assert train(one).success
    a, b = final_weights(one.output_path), final_weights(two.output_path)
    shared = a.keys() & b.keys()  # DeepSpeed may leave out the tied output layer's copy
    assert_same_weights({k: a[k] for k in shared}, {k: b[k] for k in shared}, rel=1e-4 if launch else 1e-5)


# --- bad input -----------------------------------------------------------------------------------

def test_a_bad_record_is_named_by_file_and_line(tmp_path, tiny_model_dir):
    # Line 17: past the first 16 records, read before training to show the source gives an example.
    records = [*chat_records(16), "{not json", *chat_records(6)]
    config = load_config(small_job(tmp_path / "late", tiny_model_dir, records, **STREAM, **IN_ORDER,
                                   **{"hyperparams.max_steps": 40, "hyperparams.batch_size": 4}))
    with pytest.raises(DataError, match=r"train.jsonl:17: invalid JSON"):
        train(config)  # mid-stream, after training began: still exit 2, and status.json says why
    status = json.loads((config.output_path / "status.json").read_text())
    assert status["status"] == "failed" and "train.jsonl:17" in status["error_message"]

    skipped = load_config(small_job(tmp_path / "skip", tiny_model_dir, records, **STREAM,
                                    **{"data.on_bad_record": "skip"}))
    assert train(skipped).success

    useless = load_config(small_job(tmp_path / "none", tiny_model_dir, [{"messages": []}] * 3, **STREAM,
                                    **{"data.on_bad_record": "skip"}))
    with pytest.raises(DataError, match=r"no usable examples \(3 records read"):
        train(useless)
    assert not (useless.output_path / "status.json").exists()  # refused before the folder was touched


def test_validate_reads_only_the_first_records_and_prepare_refuses(tmp_path, tiny_model_dir):
    from launcher.prepare import main_prepare
    from launcher.validate import validate_job

    config = load_config(small_job(tmp_path, tiny_model_dir, chat_records(40), **STREAM))
    report = validate_job(config)
    assert "streaming: 1 source(s)" in report and "optimizer steps: 4" in report and "[[" in report
    assert not (tmp_path / "cache").exists(), "nothing is tokenized into the cache"
    with pytest.raises(ConfigError, match="nothing to prepare"):
        main_prepare(config.source, {})
