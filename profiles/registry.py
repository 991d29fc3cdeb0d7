"""Finding a profile by name: a built-in one, or a user class given as `"pkg.module:Class"`.

    from profiles import get_profile
    profile = get_profile("sharegpt")              # a built-in
    profile = get_profile("my_profiles:QA")        # imports only the module `my_profiles`
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path

from launcher.config import ConfigError
from profiles.base import Profile
from profiles.builtin import BUILTIN_PROFILES


def available_profiles() -> list[str]:
    return sorted(BUILTIN_PROFILES)


def get_profile(name: str, search_paths: Iterable[str | Path] = ()) -> Profile:
    """An instance of the profile `name`; `ConfigError` naming `profile.name` if there is none.

    `search_paths` are folders tried for a user module (e.g. the job file's folder) when it is not
    importable from `sys.path` already.
    """
    if name in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[name]()
    if ":" not in name:
        valid = ", ".join(f'"{n}"' for n in available_profiles())
        raise ConfigError(f"profile.name: unknown profile {name!r}; valid profiles: {valid}, "
                          'or a class of your own as "pkg.module:Class"')
    return _load_user_profile(name, search_paths)


def _load_user_profile(name: str, search_paths: Iterable[str | Path]) -> Profile:
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f'profile.name: {name!r}: expected "pkg.module:Class"')
    module = _import(module_name, name, [str(Path(p)) for p in search_paths])
    cls = getattr(module, class_name, None)
    if cls is None:
        found = [n for n, obj in vars(module).items()
                 if inspect.isclass(obj) and issubclass(obj, Profile) and obj is not Profile]
        hint = f"; profiles in it: {', '.join(found)}" if found else ""
        raise ConfigError(f"profile.name: module {module_name!r} has no class {class_name!r}{hint}")
    if not (inspect.isclass(cls) and callable(getattr(cls, "transform_example", None))):
        raise ConfigError(f"profile.name: {name!r} is not a profile class; subclass profiles.Profile "
                          "and implement messages(example, index)")
    try:
        return cls()
    except Exception as error:
        raise ConfigError(f"profile.name: cannot create {name!r}: {type(error).__name__}: {error}") from error


def _import(module_name: str, name: str, search_paths: list[str]):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing top-level module is worth retrying from the job's folder; an import error
        # inside the user's module is reported as is.
        if error.name != module_name.split(".")[0] or not search_paths:
            raise ConfigError(f"profile.name: cannot import {module_name!r} for {name!r}: {error}. "
                              "Put the module on PYTHONPATH or next to the job file.") from error
    added = [p for p in search_paths if p not in sys.path]
    sys.path[:0] = added
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"profile.name: cannot import {module_name!r} for {name!r}: {error}. "
                          "Put the module on PYTHONPATH or next to the job file.") from error
    finally:
        for path in added:
            sys.path.remove(path)


def profile_fingerprint(profile: Profile) -> str:
    """A hash of the profile's code, so cached data is rebuilt when the profile changes."""
    cls = type(profile)
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        source = ""
    return hashlib.sha256(f"{cls.__module__}:{cls.__qualname__}\n{source}".encode()).hexdigest()


def fill_system_prompt(template: str, today: datetime.date | None = None) -> str:
    """`profile.system_prompt` with `{date}` replaced by today's date (ISO, e.g. 2025-01-31)."""
    # str.replace, not str.format: a prompt may contain other braces (JSON examples, code).
    return template.replace("{date}", (today or datetime.date.today()).isoformat())
