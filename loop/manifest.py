"""`manifest.json`: what a run was made of, so that it can be reproduced and compared.

    manifest = build_manifest(config, tokenizer=tokenizer, data=data, world_size=accelerator.num_processes)
    run_dir.open(..., manifest=manifest)      # the main process writes output_dir/manifest.json
    python -m launcher diff RUN_A RUN_B       # what differs between two runs' manifests and losses

The manifest holds the sha256 of each data file (every file of a data folder or glob), the
tokenized-data cache fingerprint, the tokenizer and chat-template hashes, the model's config and
weight-file hashes (or its hub revision), the resolved job, the project's version and git commit,
library versions, the seed, the world size and the hardware. Files over `FULL_HASH_LIMIT` (model
shards, mostly) are fingerprinted by their size, modification time and first and last MiB instead
of read in full; each file record says which.

A file that cannot be read is recorded with its error and a probe that fails as null: building
the manifest does not fail a run.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from launcher.config import JobConfig

FORMAT = 1
FULL_HASH_LIMIT = 1 << 30
"""Files up to this size (1 GiB) get a full sha256; larger ones a fingerprint (see `file_record`)."""
EDGE_BYTES = 1 << 20
LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "peft", "deepspeed",
             "bitsandbytes")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PROJECT = "trainer-engine"
REPO_ROOT = Path(__file__).resolve().parent.parent


def build_manifest(config: JobConfig, *, tokenizer, data, world_size: int, run_id: str | None = None,
                   resumed_from_step: int | None = None) -> dict[str, Any]:
    """The manifest of a run of `config` (`data` is `loop.data.PreparedData`); a JSON-ready dict."""
    h = config.hyperparams
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": run_id,
        "resumed_from_step": resumed_from_step,
        "data": data_section(config, data),
        "tokenizer": tokenizer_section(config, tokenizer),
        "model": model_section(config),
        "job": config.to_dict(),
        "project": project_section(),
        "libraries": library_versions(),
        "seeds": {"seed": h.seed, "shuffle": config.data.shuffle},
        "world_size": world_size,
        "hardware": hardware(),
    }


# --- files ----------------------------------------------------------------------------------------

def file_record(path: str | Path, *, full_limit: int = FULL_HASH_LIMIT) -> dict[str, Any]:
    """{path, size, sha256, hashed}; above `full_limit` bytes `sha256` covers the size, mtime and the
    first and last MiB only (`hashed` says so). A file that cannot be read gets `error`."""
    path = Path(path)
    try:
        stat = path.stat()
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            if stat.st_size <= full_limit:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(chunk)
                hashed = "full"
            else:
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
                digest.update(handle.read(EDGE_BYTES))
                handle.seek(-EDGE_BYTES, os.SEEK_END)
                digest.update(handle.read(EDGE_BYTES))
                hashed = "size, mtime, first and last MiB"
    except OSError as error:
        return {"path": str(path), "error": f"{type(error).__name__}: {error.strerror or error}"}
    return {"path": str(path), "size": stat.st_size, "sha256": digest.hexdigest(), "hashed": hashed}


def data_section(config: JobConfig, data) -> dict[str, Any]:
    """A record per data path of the job (see `path_record`), the cache fingerprint and the data digest."""
    section: dict[str, Any] = {"train": path_record(config.data.dataset_path) if config.data.dataset_path else None,
                               "validation": path_record(config.data.validation_path)
                               if config.data.validation_path else None}
    for number, source in enumerate(getattr(config.data, "sources", None) or [], start=1):
        section[f"sources[{number}]"] = path_record(source.path)
        if source.validation_path:
            section[f"sources[{number}].validation"] = path_record(source.validation_path)
    cache_path = getattr(data, "cache_path", None)
    section.update({
        "cache_fingerprint": cache_path.name if cache_path else None,
        "cache_path": str(cache_path) if cache_path else None,
        "digest": getattr(data, "digest", None),
        "num_train_rows": len(data.train) if getattr(data, "train", None) is not None else None,
    })
    return section


def path_record(path: str) -> dict[str, Any]:
    """A data path as configured: a file's `file_record`; for a folder or a glob, a record per file
    under `files`; anything else (a hub dataset id) by its name only."""
    if os.path.isfile(path):
        return file_record(path)
    if os.path.isdir(path):
        root = Path(path)
        files = sorted(p for p in root.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        return {"path": path, "files": {p.relative_to(root).as_posix(): _without_path(file_record(p)) for p in files}}
    matches = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else []
    if matches:
        return {"path": path, "files": {m: _without_path(file_record(m)) for m in matches if os.path.isfile(m)}}
    return {"path": path, "files": None, "note": "not a local file or folder (a hub dataset id?): not hashed"}


def tokenizer_section(config: JobConfig, tokenizer) -> dict[str, Any]:
    from loop.data.cache import tokenizer_digest

    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return {
        "path": config.model.tokenizer_path or config.model.model_path,
        "class": type(tokenizer).__name__,
        "sha256": tokenizer_digest(tokenizer, template),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }


def model_section(config: JobConfig) -> dict[str, Any]:
    """A local folder: the sha256 of config.json and a record per weight file. A hub id: the revision
    of its cached snapshot (and that snapshot's config.json), when it is cached."""
    path = Path(config.model.model_path)
    if path.is_dir():
        weights = sorted(p for p in path.iterdir() if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES)
                                                                        or p.name.endswith(".index.json")))
        config_file = path / "config.json"
        return {"path": str(path), "revision": None,
                "config_sha256": file_record(config_file).get("sha256") if config_file.is_file() else None,
                "files": {p.name: _without_path(file_record(p)) for p in weights}}
    revision, config_sha = None, None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(config.model.model_path, "config.json")
        if isinstance(cached, str):
            revision = Path(cached).parent.name  # .../snapshots/<commit>/config.json
            config_sha = file_record(cached).get("sha256")
    except Exception:  # an old huggingface_hub or an odd cache: the revision is unknown, nothing more
        pass
    return {"path": config.model.model_path, "revision": revision, "config_sha256": config_sha, "files": {}}


def _without_path(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "path"}


# --- software and hardware ---------------------------------------------------------------------------

def library_versions() -> dict[str, str | None]:
    """Python and each library in `LIBRARIES` (null when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def project_section() -> dict[str, Any]:
    try:
        version = importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:
        version = None
    commit = dirty = None
    if (REPO_ROOT / ".git").exists():  # a checkout, not an installed copy inside someone else's repository
        commit = _git("rev-parse", "HEAD")
        # --no-optional-locks: a read, never a refresh of the index
        status = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {"name": PROJECT, "version": version, "git_commit": commit, "git_dirty": dirty}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "memory_bytes": _memory_bytes(),
                            "gpus": [], "gpu_driver": None, "cuda": None, "cudnn": None}
    try:
        import torch

        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cudnn"] = torch.backends.cudnn.version()
            info["gpu_driver"] = _nvidia_driver()
    except Exception:  # a broken CUDA setup must not stop the run from recording the rest
        pass
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _nvidia_driver() -> str | None:
    try:
        # "NVRM version: NVIDIA UNIX [Open] Kernel Module [for x86_64]  550.54.15  <build date>"
        match = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", Path("/proc/driver/nvidia/version").read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
        return done.stdout.split()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
