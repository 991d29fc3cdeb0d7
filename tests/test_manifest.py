"""manifest.json in every run folder, and `python -m launcher diff` between two runs.

The manifest's hashes are checked against hashes computed here from the files themselves, and the
cache fingerprint against the folder the data layer names; `diff` must name a changed data file and
a changed learning rate, and find the first step where two runs' losses part.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from pathlib import Path

import pytest

from helpers import chat_records, run_cli, small_job, write_jsonl
from launcher.config import load_config
from loop.manifest import file_record, library_versions
from loop.train import train


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def trained(folder: Path, model_dir: Path, records=None, **dotted):
    config = load_config(small_job(folder, model_dir, records, **dotted))
    result = train(config)
    assert result.success, result.error
    return config


def test_every_run_writes_a_manifest_of_what_it_was_made_of(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoTokenizer

    from loop.data import build_datasets, load_tokenizer

    config = trained(tmp_path, tiny_model_dir)
    manifest = json.loads((config.output_path / "manifest.json").read_text())

    assert manifest["data"]["train"]["sha256"] == sha256(tmp_path / "train.jsonl")
    assert manifest["data"]["train"]["hashed"] == "full" and manifest["data"]["validation"] is None
    # The cache fingerprint names the folder the data layer loads this job's rows from.
    prepared = build_datasets(config, load_tokenizer(config))
    assert prepared.from_cache and manifest["data"]["cache_fingerprint"] == prepared.cache_path.name
    template = AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert manifest["tokenizer"]["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert manifest["model"]["config_sha256"] == sha256(tiny_model_dir / "config.json")
    weights = sorted(p.name for p in tiny_model_dir.glob("*.safetensors"))
    assert sorted(manifest["model"]["files"]) == weights
    for name in weights:
        assert manifest["model"]["files"][name]["sha256"] == sha256(tiny_model_dir / name)

    assert manifest["job"] == json.loads(json.dumps(config.to_dict()))
    assert manifest["seeds"]["seed"] == config.hyperparams.seed and manifest["world_size"] == 1
    assert manifest["libraries"]["torch"] == torch.__version__
    libraries = {"transformers", "accelerate", "datasets", "peft", "deepspeed", "bitsandbytes"}
    assert libraries <= manifest["libraries"].keys()
    assert manifest["project"]["version"] == importlib.metadata.version("trainer-engine")
    commit = manifest["project"]["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert manifest["hardware"]["cpu_count"] and "gpus" in manifest["hardware"]


def test_a_library_that_is_not_installed_is_recorded_as_null(monkeypatch):
    import loop.manifest

    monkeypatch.setattr(loop.manifest, "LIBRARIES", ("torch", "no-such-package-trainer-engine"))
    versions = library_versions()
    assert versions["no-such-package-trainer-engine"] is None and versions["torch"]


def test_a_file_too_large_to_read_in_full_is_fingerprinted_by_its_size_and_ends(tmp_path):
    path = tmp_path / "shard.safetensors"
    data = bytearray(3 << 20)
    path.write_bytes(data)
    whole = file_record(path)
    fingerprint = file_record(path, full_limit=1 << 20)
    assert whole["hashed"] == "full" and whole["sha256"] == hashlib.sha256(data).hexdigest()
    assert fingerprint["hashed"] == "size, mtime, first and last MiB" and fingerprint["sha256"] != whole["sha256"]
    data[-1] = 1  # the last MiB is read
    path.write_bytes(data)
    assert file_record(path, full_limit=1 << 20)["sha256"] != fingerprint["sha256"]


# --- diff ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Four finished runs reading shared data files: a base, its exact repeat, one with another learning
    rate, one with other data and another learning rate."""
    root = tmp_path_factory.mktemp("diff")
    data = write_jsonl(root / "train.jsonl", chat_records(12))
    other = write_jsonl(root / "other.jsonl", chat_records(12, start=50))
    shared = {"data.dataset_path": str(data), "data.cache_dir": str(root / "cache")}
    return {
        "base": trained(root / "base", tiny_model_dir, **shared),
        "repeat": trained(root / "repeat", tiny_model_dir, **shared),
        "lr": trained(root / "lr", tiny_model_dir, **shared, **{"hyperparams.learning_rate": 2e-3}),
        "data": trained(root / "data", tiny_model_dir, **{**shared, "data.dataset_path": str(other),
                                                           "hyperparams.learning_rate": 2e-3}),
    }


def diff(runs, a: str, b: str, capsys) -> str:
    code, out, err = run_cli(["diff", runs[a].output_path, runs[b].output_path], capsys)
    assert code == 0, err
    return out


def test_diff_names_a_changed_data_file_and_learning_rate(runs, capsys):
    out = diff(runs, "base", "data", capsys)
    old = sha256(Path(runs["base"].data.dataset_path))
    new = sha256(Path(runs["data"].data.dataset_path))
    assert f"  data.train.sha256: {old[:12]}... -> {new[:12]}..." in out
    assert "  hyperparams.learning_rate: 0.001 -> 0.002" in out
    assert "losses (metrics.jsonl): first differ at step 1:" in out


def test_diff_finds_the_first_step_where_the_losses_part(runs, capsys):
    from loop.status import read_jsonl

    losses = {name: {r["step"]: r["loss"] for r in read_jsonl(runs[name].output_path / "metrics.jsonl") if "loss" in r}
              for name in ("base", "lr")}
    out = diff(runs, "base", "lr", capsys)
    # The learning rate first acts on the loss of step 2: step 1 is computed before any update.
    assert losses["base"][1] == losses["lr"][1]
    assert f"first differ at step 2: {losses['base'][2]!r} -> {losses['lr'][2]!r}" in out
    assert "identical before it (step 1)" in out
    assert "job (job.toml): 1 difference\n  hyperparams.learning_rate: 0.001 -> 0.002" in out
    assert "data.train.sha256" not in out


def test_diff_of_two_runs_of_the_same_job_says_the_losses_are_identical(runs, capsys):
    out = diff(runs, "base", "repeat", capsys)
    assert "losses (metrics.jsonl): identical over the 4 logged steps in common (steps 1-4)" in out
    assert "job (job.toml): the same" in out
    assert "(also differ, as between any two runs:" in out


def test_diff_of_a_folder_that_is_not_a_run_exits_2(runs, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("hello")
    code, _, err = run_cli(["diff", runs["base"].output_path, tmp_path / "notes"], capsys)
    assert code == 2 and "is not a run folder" in err
    code, _, err = run_cli(["diff", tmp_path / "missing", runs["base"].output_path], capsys)
    assert code == 2 and "no such folder" in err
