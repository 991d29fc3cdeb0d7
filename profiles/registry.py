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
import os
import sys
import sysconfig
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
    """A hash of the profile's code, so cached data is rebuilt when the profile changes.

    A user profile's code is its module with every `.py` file beside it: the whole top-level
    package for a module in a package; for a top-level module, the files of its folder and of the
    packages (folders with `__init__.py`) below it. Modules it refers to from elsewhere (a base class
    or helper on PYTHONPATH) count too. So editing a helper it imports changes the hash. Installed
    packages, the standard library and this project are left out (a built-in or installed profile
    counts by its module's source), and so are the files' locations: a moved project keeps its
    cache and its runs.
    """
    cls = type(profile)
    digest = hashlib.sha256(f"{cls.__module__}:{cls.__qualname__}\n".encode())
    files = _profile_files(cls)
    if not files:  # a built-in or installed profile: the source of its module
        try:
            digest.update(inspect.getsource(sys.modules[cls.__module__]).encode())
        except (OSError, TypeError, KeyError):
            pass  # no source to read (a compiled or frozen module): its name and class alone
    for label, path in sorted(files.items()):
        digest.update(f"{label}\n".encode())
        try:
            digest.update(path.read_bytes())
        except OSError as error:  # vanished or unreadable: the hash still differs from a readable file's
            digest.update(f"unreadable: {error.strerror}\n".encode())
    return digest.hexdigest()


_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__", "node_modules"}


def _profile_files(cls: type) -> dict[str, Path]:
    """The user's own source files behind a profile class, by a location-free label (none for a built-in)."""
    module = sys.modules.get(cls.__module__)
    top = sys.modules.get(cls.__module__.split(".")[0])
    if _own_file(module) is None or top is None:
        return {}
    if getattr(top, "__path__", None):  # a package: all of it (a helper may sit in a sibling subpackage)
        files = {f"{top.__name__}/{label}": path for root in top.__path__ if not _is_skipped(Path(root).resolve())
                 for label, path in _python_files(Path(root), packages_only=False)}
    else:  # a module next to the job file: its folder, without data or output folders
        files = dict(_python_files(Path(top.__file__).parent, packages_only=True))
    known = set(files.values())
    for name, path in _referenced_modules(module, cls).items():
        if path not in known:
            files[name] = path
    return files


def _referenced_modules(module, cls: type) -> dict[str, Path]:
    """The user's own modules that `module` and `cls` refer to, transitively: name -> file."""
    found: dict[str, Path] = {}
    pending = [module, *(sys.modules.get(c.__module__) for c in cls.__mro__)]
    while pending:
        current = pending.pop()
        path = _own_file(current)
        if path is None or current.__name__ in found:
            continue
        found[current.__name__] = path
        for value in vars(current).values():
            if inspect.ismodule(value):
                pending.append(value)
                continue
            try:
                name = getattr(value, "__module__", None)
            except Exception:  # an object whose attribute access misbehaves refers to nothing
                continue
            if isinstance(name, str) and name not in found:
                pending.append(sys.modules.get(name))
    return found


def _own_file(module) -> Path | None:
    """The source file of a module that is the user's own: not installed, not stdlib, not built in."""
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or not file.endswith(".py"):
        return None
    path = Path(file).resolve()
    return None if _is_skipped(path) else path


def _python_files(folder: Path, packages_only: bool) -> list[tuple[str, Path]]:
    """`(path relative to folder, resolved path)` of the user's `.py` files in `folder`, recursively."""
    found = []
    folder = folder.resolve()
    for parent, folders, names in os.walk(folder):
        # Hidden folders (.git, .venv) and installed packages hold no profile code of the user's; beside
        # a top-level module, only packages do (not the data, cache or output folders next to a job).
        folders[:] = sorted(f for f in folders if not f.startswith(".") and f not in _SKIPPED_FOLDERS
                            and (not packages_only or Path(parent, f, "__init__.py").is_file()))
        for name in sorted(names):
            path = Path(parent, name)
            if name.endswith(".py") and not _is_skipped(path.resolve()):
                found.append((path.relative_to(folder).as_posix(), path.resolve()))
    return found


def _is_skipped(path: Path) -> bool:
    """Not the user's own code: installed, standard library, or this project's (the built-in profiles
    are hashed with the data layer's own code)."""
    return (bool(_SKIPPED_FOLDERS & set(path.parts)) or path.is_relative_to(_STDLIB)
            or path.parent == _BUILTIN or any(path.is_relative_to(folder) for folder in _PROJECT_PACKAGES))


_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
_BUILTIN = Path(__file__).parent.resolve()
_PROJECT_PACKAGES = [_BUILTIN.parent / "launcher", _BUILTIN.parent / "loop"]


def fill_system_prompt(template: str, today: datetime.date | None = None) -> str:
    """`profile.system_prompt` with `{date}` replaced by today's date (ISO, e.g. 2025-01-31)."""
    # str.replace, not str.format: a prompt may contain other braces (JSON examples, code).
    return template.replace("{date}", (today or datetime.date.today()).isoformat())
