"""Data sources: formats, column maps, several sources with their own profiles and weights, bad
sources refused naming them, and the bounded-memory pipeline giving the same rows as in memory.

    .venv/bin/python -m pytest tests/test_sources.py -q
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import chat_records, write_job, write_jsonl

from launcher.config import ConfigError, load_config
from loop.data import DataError, build_datasets, load_tokenizer

RECORDS = chat_records(24)


def rows(dataset) -> list[tuple[list[int], list[int]]]:
    return [(list(r["input_ids"]), list(r["labels"])) for r in dataset]


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture
def prepare(tiny_model_dir, tmp_path):
    """`prepare(name, **dotted)` -> PreparedData of a job in `tmp_path/name` (data paths relative to tmp_path)."""
    def run(name: str, **dotted):
        folder = tmp_path / name
        job = write_job(folder, tiny_model_dir, **{"data.cache_dir": str(tmp_path / "cache"), **dotted})
        config = load_config(job)
        return build_datasets(config, load_tokenizer(config))
    return run


def sources_job(tmp_path, tiny_model_dir, sources: list[dict], **dotted):
    """A job file of `[[data.sources]]` tables (written as TOML tables, as a user would)."""
    dotted = {"data.cache_dir": str(tmp_path / "cache"), **dotted}
    lines = [f'[model]\nmodel_path = "{tiny_model_dir}"', f'[output]\noutput_dir = "{tmp_path / "out"}"', "[data]"]
    lines += [f"{key.split('.', 1)[1]} = {json.dumps(value)}" for key, value in dotted.items()
              if key.startswith("data.")]
    for section in ("monitoring", "hyperparams"):
        keys = {k: v for k, v in dotted.items() if k.startswith(f"{section}.")}
        if keys:
            lines.append(f"[{section}]")
            lines += [f"{k.split('.', 1)[1]} = {json.dumps(v)}" for k, v in keys.items()]
    for source in sources:
        lines.append("[[data.sources]]")
        for key, value in source.items():
            if isinstance(value, dict):
                value = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + "}"
            else:
                value = json.dumps(value)
            lines.append(f"{key} = {value}")
    job = tmp_path / "job.toml"
    job.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return job


def build(job):
    config = load_config(job)
    return build_datasets(config, load_tokenizer(config))


# --- formats -------------------------------------------------------------------------------------

def _formats(tmp_path):
    import datasets

    write_jsonl(tmp_path / "data" / "train.jsonl", RECORDS)
    (tmp_path / "data" / "array.json").write_text(json.dumps(RECORDS))
    (tmp_path / "data" / "wrapped.json").write_text(json.dumps({"data": RECORDS}, indent=2))
    write_jsonl(tmp_path / "data" / "lines.json", RECORDS)  # JSON Lines named .json, as many are
    write_parquet(tmp_path / "data" / "one.parquet", RECORDS)
    for i, start in enumerate(range(0, len(RECORDS), 10)):
        write_parquet(tmp_path / "data" / "shards" / f"part-{i:05d}.parquet", RECORDS[start:start + 10])
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "data" / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                          "test": datasets.Dataset.from_list(RECORDS[:3])}).save_to_disk(
        str(tmp_path / "data" / "saved_dict"))


FORMATS = ["array.json", "wrapped.json", "lines.json", "one.parquet", "shards", "shards/part-*.parquet", "saved",
           "saved_dict"]


@pytest.mark.parametrize("path", FORMATS)
def test_every_format_gives_the_rows_of_the_same_records_in_jsonl(prepare, tmp_path, path):
    _formats(tmp_path)
    reference = prepare("jsonl", **{"data.dataset_path": str(tmp_path / "data" / "train.jsonl")})
    other = prepare("other", **{"data.dataset_path": str(tmp_path / "data" / path)})
    assert rows(other.train) == rows(reference.train)
    for key in ("num_read", "num_kept", "num_tokens", "num_trained_tokens", "dropped"):
        assert getattr(other.report, key) == getattr(reference.report, key), key


def test_a_saved_dataset_dict_reads_the_split_asked_for(prepare, tmp_path):
    _formats(tmp_path)
    test_split = prepare("split", **{"data.dataset_path": str(tmp_path / "data" / "saved_dict"),
                                     "data.split": "test"})
    assert test_split.report.num_read == 3
    # Validation from another split of the same dataset.
    both = prepare("both", **{"data.dataset_path": str(tmp_path / "data" / "saved_dict"),
                              "data.validation_split_name": "test"})
    assert (len(both.train), len(both.validation)) == (len(RECORDS), 3)


def test_column_map_reads_profile_fields_from_other_columns(prepare, tmp_path):
    alpaca = [{"instruction": f"Add {i} and {i}.", "output": f"The sum is {2 * i}."} for i in range(12)]
    renamed = [{"question": r["instruction"], "answer": r["output"], "id": i} for i, r in enumerate(alpaca)]
    write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    write_parquet(tmp_path / "renamed.parquet", renamed)
    write_jsonl(tmp_path / "renamed.jsonl", renamed)
    reference = prepare("a", **{"data.dataset_path": str(tmp_path / "alpaca.jsonl"), "profile.name": "alpaca"})
    for path in ("renamed.parquet", "renamed.jsonl"):
        mapped = prepare(f"b-{path}", **{"data.dataset_path": str(tmp_path / path), "profile.name": "alpaca",
                                         "data.column_map": {"instruction": "question", "output": "answer"}})
        assert rows(mapped.train) == rows(reference.train), path


def test_bad_rows_of_other_formats_are_named_by_shard_and_row(prepare, tmp_path):
    bad = [*RECORDS[:5], {"messages": [{"role": "martian", "content": "hi"}]}, *RECORDS[5:8]]
    write_parquet(tmp_path / "shards" / "a.parquet", RECORDS[:4])
    write_parquet(tmp_path / "shards" / "b.parquet", bad)
    with pytest.raises(DataError, match=r"b\.parquet row 5: .*unknown role 'martian'"):
        prepare("parquet", **{"data.dataset_path": str(tmp_path / "shards")})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad\.json row 5: "):
        prepare("json", **{"data.dataset_path": str(tmp_path / "bad.json")})
    skipped = prepare("skip", **{"data.dataset_path": str(tmp_path / "shards"), "data.on_bad_record": "skip"})
    assert skipped.report.dropped == {"invalid_record": 1}
    assert skipped.report.problems[0].startswith(f"{tmp_path / 'shards' / 'b.parquet'} row 5: ")


def test_jsonl_keeps_naming_the_line(prepare, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [*RECORDS[:3], "", "{not json"])
    with pytest.raises(DataError, match=r"data\.jsonl:5: invalid JSON"):
        prepare("j", **{"data.dataset_path": str(tmp_path / "data.jsonl")})


# --- bad sources: refused with exit 2, naming the source -----------------------------------------

def _validate(job, capsys) -> tuple[int, str]:
    from launcher.cli import main

    code = main(["validate", str(job)])
    return code, capsys.readouterr().err


def test_bad_sources_are_refused_naming_the_source(tmp_path, tiny_model_dir, capsys):
    import datasets

    write_jsonl(tmp_path / "good.jsonl", RECORDS)
    write_parquet(tmp_path / "qa.parquet", [{"question": "q", "answer": "a"}])
    (tmp_path / "broken").mkdir()
    write_parquet(tmp_path / "broken" / "part-0.parquet", RECORDS[:3])
    (tmp_path / "broken" / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dict"))
    good = {"path": "good.jsonl"}
    cases = {
        "missing column": ([good, {"path": "qa.parquet", "profile": "alpaca",
                                   "column_map": {"instruction": "prompt", "output": "answer"}}],
                           ["data.sources[2].path", "qa.parquet", "no column 'prompt'", "question, answer"]),
        "unreadable shard": ([good, {"path": "broken"}], ["data.sources[2].path", "part-1.parquet"]),
        "unknown split": ([good, {"path": "dict", "split": "nope"}],
                          ["data.sources[2].path", "no split 'nope'", "its splits: train"]),
        "zero weight": ([{**good, "weight": 0}, {"path": "good.jsonl", "weight": 0}],
                        ["data.sources[1].weight", "weight = 0 takes nothing"]),
        "half weighted": ([{**good, "weight": 2}, {"path": "good.jsonl"}], ["data.sources[2].weight"]),
        "weight and count": ([{**good, "weight": 1, "num_samples": 3}], ["data.sources[1].num_samples"]),
        "missing file": ([good, {"path": "nope.jsonl"}], ["data.sources[2].path", "file not found"]),
        "unknown profile": ([good, {"path": "good.jsonl", "profile": "nope"}], ["data.sources[2].profile"]),
    }
    for name, (sources, expected) in cases.items():
        job = sources_job(tmp_path, tiny_model_dir, sources)
        code, err = _validate(job, capsys)
        assert code == 2, (name, err)
        for text in expected:
            assert text in err, (name, text, err)
        assert "Traceback" not in err


def test_an_unknown_hub_dataset_is_refused_naming_the_source(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no test reaches the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    write_jsonl(tmp_path / "good.jsonl", RECORDS)
    job = sources_job(tmp_path, tiny_model_dir, [{"path": "good.jsonl"},
                                                 {"path": "nobody/no-such-dataset", "split": "train"}])
    code, err = _validate(job, capsys)
    assert code == 2 and "data.sources[2].path: cannot load the hub dataset nobody/no-such-dataset" in err


def test_the_hub_reader_loads_through_load_dataset_with_split_and_digest(tmp_path, monkeypatch):
    """A hub id is read with `datasets.load_dataset`; here it is given a local folder of Parquet
    shards named as hub repositories name them, which it reads the same way, offline."""
    import datasets.config
    import huggingface_hub.constants

    from loop.data.sources import DataFiles, data_files

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    write_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet", RECORDS)
    write_parquet(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet", RECORDS[:3])
    local = data_files(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"), "data.dataset_path")

    def hub(split: str = "", key: str = "data.dataset_path") -> DataFiles:
        return DataFiles(path=str(tmp_path / "repo"), key=key, kind="hub", split=split)

    train = hub()
    train.check()
    assert train.split == "train"
    assert [r for _, r in train.records(0)] == [r for _, r in local.records(0)]
    assert train.where(0, 7) == f"{tmp_path / 'repo'} [train] row 7"
    assert train.num_rows() == len(RECORDS) and train.digest() == hub().digest() != hub("test").digest()
    validation = hub(key="data.validation_path")  # no "validation" split: "test" is taken
    assert validation.num_rows() == 3 and validation.split == "test"
    with pytest.raises(DataError, match=r"data.dataset_path: cannot load the hub dataset .*split 'nope'"):
        hub("nope").check()


def test_dataset_path_and_sources_together_are_refused(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "good.jsonl", RECORDS)
    job = sources_job(tmp_path, tiny_model_dir, [{"path": "good.jsonl"}],
                      **{"data.dataset_path": str(tmp_path / "good.jsonl")})
    with pytest.raises(ConfigError, match="set either data.dataset_path or"):
        load_config(job)


def test_source_keys_are_named_with_their_line(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "good.jsonl", RECORDS)
    job = sources_job(tmp_path, tiny_model_dir, [{"path": "good.jsonl"}, {"path": "good.jsonl", "wieght": 2}])
    line = job.read_text().splitlines().index('wieght = 2') + 1
    with pytest.raises(ConfigError) as info:
        load_config(job)
    assert f"{job}:{line}: data.sources[2].wieght: unknown key `wieght` in [[data.sources]]; did you mean " \
           "`weight`?" in str(info.value)


def test_a_job_with_sources_round_trips_through_to_toml(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "good.jsonl", RECORDS)
    job = sources_job(tmp_path, tiny_model_dir, [
        {"path": "good.jsonl", "weight": 2.5, "column_map": {"instruction": "a b", "output": 'say "x"'}},
        {"path": "good.jsonl", "name": "second", "train_on": "all", "weight": 1}])
    config = load_config(job)
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml(), encoding="utf-8")
    assert load_config(again) == config


# --- several sources -----------------------------------------------------------------------------

def test_sources_without_weights_are_the_single_source_jobs_side_by_side(prepare, tmp_path, tiny_model_dir):
    """Each source keeps its own profile, system prompt and train_on: the mix is exactly the rows each
    source gives alone, in order."""
    alpaca = [{"instruction": f"Name a number above {i}.", "output": f"{i + 1}"} for i in range(9)]
    write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    chat_alone = prepare("chat", **{"data.dataset_path": str(tmp_path / "chat.jsonl"), "profile.train_on": "all"})
    alpaca_alone = prepare("alpaca", **{"data.dataset_path": str(tmp_path / "alpaca.jsonl"),
                                        "profile.name": "alpaca", "profile.system_prompt": "Answer with digits."})
    job = sources_job(tmp_path, tiny_model_dir, [
        {"path": "chat.jsonl", "train_on": "all"},
        {"path": "alpaca.jsonl", "profile": "alpaca", "system_prompt": "Answer with digits."}])
    mixed = build(job)
    assert rows(mixed.train) == rows(chat_alone.train) + rows(alpaca_alone.train)
    entries = {s["name"]: s for s in mixed.report.sources}
    assert entries["chat.jsonl"]["num_trained_tokens"] == chat_alone.report.num_trained_tokens
    assert entries["alpaca.jsonl"]["num_tokens"] == alpaca_alone.report.num_tokens
    report = mixed.report
    for key in ("num_read", "num_kept", "num_train_examples", "num_tokens", "num_trained_tokens"):
        assert sum(s[key] for s in report.sources) == getattr(report, key), key
    assert sum(s["share"] for s in report.sources) == pytest.approx(1.0)


def _tagged(tag: str, count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}"},
                          {"role": "assistant", "content": f"{tag} answer {i}"}]} for i in range(count)]


def _tags(data, tokenizer) -> Counter:
    return Counter(tokenizer.decode(r["input_ids"]).split("<|im_start|>user\n")[1].split(" ")[0] for r in data.train)


def test_weights_set_each_sources_share_of_the_mix(tmp_path, tiny_model_dir, tiny_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", _tagged("alpha", 30))
    write_jsonl(tmp_path / "b.jsonl", _tagged("beta", 10))
    job = sources_job(tmp_path, tiny_model_dir, [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "weight": 3}])
    data = build(job)
    assert _tags(data, tiny_tokenizer) == {"alpha": 10, "beta": 30}  # 40 examples, shared 1:3
    shares = {s["name"]: s["share"] for s in data.report.sources}
    assert shares == {"a.jsonl": 0.25, "b.jsonl": 0.75}
    beta = [tiny_tokenizer.decode(r["input_ids"]) for r in data.train if "beta" in tiny_tokenizer.decode(r["input_ids"])]
    assert set(Counter(beta).values()) == {3}  # up-sampled: every example three times
    assert "sources:" in data.report.format()


def test_num_samples_up_and_down_samples_deterministically_by_seed(tmp_path, tiny_model_dir, tiny_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", _tagged("alpha", 10))
    write_jsonl(tmp_path / "b.jsonl", _tagged("beta", 10))

    def picked(seed: int, cache: str):
        job = sources_job(tmp_path, tiny_model_dir, [{"path": "a.jsonl", "num_samples": 25},
                                                     {"path": "b.jsonl", "num_samples": 4}],
                          **{"data.cache_dir": str(tmp_path / cache), "hyperparams.seed": seed})
        data = build(job)
        texts = [tiny_tokenizer.decode(r["input_ids"]) for r in data.train]
        return Counter(t for t in texts if "alpha" in t), sorted(t for t in texts if "beta" in t)

    alpha, beta = picked(1, "cache-1")
    assert sum(alpha.values()) == 25 and sorted(Counter(alpha.values()).items()) == [(2, 5), (3, 5)]
    assert len(beta) == 4 and len(set(beta)) == 4  # down-sampled without repeats
    assert picked(1, "cache-again") == (alpha, beta)  # prepared again from scratch: the same choice
    assert picked(2, "cache-2")[1] != beta  # another seed, another choice


def test_validation_per_source_and_overall(tmp_path, tiny_model_dir, tiny_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", _tagged("alpha", 8))
    write_jsonl(tmp_path / "a-val.jsonl", _tagged("alphaval", 3))
    write_jsonl(tmp_path / "b.jsonl", _tagged("beta", 8))
    per_source = build(sources_job(tmp_path, tiny_model_dir, [
        {"path": "a.jsonl", "validation_path": "a-val.jsonl"}, {"path": "b.jsonl"}]))
    assert len(per_source.train) == 16 and len(per_source.validation) == 3
    assert [s["num_validation_examples"] for s in per_source.report.sources] == [3, 0]

    write_jsonl(tmp_path / "val.jsonl", _tagged("overall", 5))
    overall = build(sources_job(tmp_path, tiny_model_dir, [{"path": "a.jsonl"}, {"path": "b.jsonl"}],
                                **{"data.validation_path": str(tmp_path / "val.jsonl")}))
    assert len(overall.validation) == 5 and overall.report.sources[-1]["is_validation"]
    assert overall.report.num_read == 21

    split = build(sources_job(tmp_path, tiny_model_dir, [{"path": "a.jsonl"}, {"path": "b.jsonl"}],
                              **{"monitoring.validation_split": 0.25}))
    assert len(split.validation) == 4 and len(split.train) == 12
    assert sum(s["num_validation_examples"] for s in split.report.sources) == 4


def test_result_summary_reports_each_source(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "a.jsonl", _tagged("alpha", 6))
    write_jsonl(tmp_path / "b.jsonl", [*_tagged("beta", 4), "{bad"])
    data = build(sources_job(tmp_path, tiny_model_dir, [{"path": "a.jsonl"}, {"path": "b.jsonl"}],
                             **{"data.on_bad_record": "skip"}))
    summary = json.loads(json.dumps(data.report.to_dict()))  # what result.json holds under summary["data"]
    entry = next(s for s in summary["sources"] if s["name"] == "b.jsonl")
    assert (entry["num_read"], entry["num_kept"], entry["dropped"]) == (5, 4, {"invalid_json": 1})
    assert summary["num_dropped"] == 1


# --- bounded memory: the same rows as in memory ----------------------------------------------------

def test_chunked_tokenizing_and_packing_give_the_in_memory_rows(make_job, tmp_path, monkeypatch):
    import datasets

    import loop.data.stream as stream
    from loop.data.prepare import pack

    records = chat_records(60)
    config = make_job(tmp_path / "one", records=records, **{"data.packing": True, "data.max_length": 96})
    whole = build_datasets(config, load_tokenizer(config))
    monkeypatch.setattr(stream, "CHUNK_BYTES", 500)  # a few records per chunk
    monkeypatch.setattr(stream, "PACK_TOKENS", 150)  # a couple of bins per chunk
    monkeypatch.setattr(stream, "WRITE_ROWS", 7)
    config = make_job(tmp_path / "chunked", records=records, **{"data.packing": True, "data.max_length": 96})
    chunked = build_datasets(config, load_tokenizer(config))
    packed_rows = [(list(r["input_ids"]), list(r["labels"]), list(r["position_ids"])) for r in chunked.train]
    assert packed_rows == [(list(r["input_ids"]), list(r["labels"]), list(r["position_ids"])) for r in whole.train]
    def without_paths(report) -> dict:
        return {**report.to_dict(), "sources": [{**s, "path": None} for s in report.sources]}

    assert without_paths(chunked.report) == without_paths(whole.report)

    # And both equal packing in memory the unpacked rows of the same job.
    config = make_job(tmp_path / "unpacked", records=records, **{"data.max_length": 96})
    unpacked = build_datasets(config, load_tokenizer(config)).train
    in_memory = pack(datasets.Dataset.from_list([{"input_ids": i, "labels": l} for i, l in rows(unpacked)]), 96)
    assert [list(r["position_ids"]) for r in in_memory] == [r[2] for r in packed_rows]


def test_a_huge_record_is_cut_before_tokenizing_with_the_same_tokens(make_job, tmp_path, monkeypatch):
    import loop.data.stream as stream

    words = " ".join(f"word{i % 97}" for i in range(200_000))  # about 1.5 MB in one reply
    records = [{"messages": [{"role": "user", "content": "Say many words."},
                             {"role": "assistant", "content": words}]}, *chat_records(3)]
    config = make_job(tmp_path / "cut", records=records, **{"data.max_length": 64})
    cut = build_datasets(config, load_tokenizer(config))
    assert stream.text_limit(load_tokenizer(config), 64) < len(words)
    monkeypatch.setattr(stream, "text_limit", lambda tokenizer, max_length: 0)  # 0: the whole text
    config = make_job(tmp_path / "whole", records=records, **{"data.max_length": 64})
    whole = build_datasets(config, load_tokenizer(config))
    assert rows(cut.train) == rows(whole.train) and cut.report.num_truncated == whole.report.num_truncated


def test_prepare_command_builds_the_cache_that_a_run_loads(make_job, tmp_path, capsys):
    from launcher.prepare import main_prepare

    config = make_job(tmp_path)
    assert main_prepare(config.source, {}) == 0
    out = capsys.readouterr().out
    assert "examples: 16 read, 16 kept" in out and "(prepared now)" in out
    again = build_datasets(config, load_tokenizer(config))
    assert again.from_cache and f"cache: {again.cache_path} (prepared now)" in out
    assert main_prepare(config.source, {"data.max_length": 64}) == 0
    assert "(prepared now)" in capsys.readouterr().out
