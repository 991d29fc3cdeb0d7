"""Every import points down: launcher commands -> loop -> profiles -> the job and result types.

docs/architecture.md draws the floors. `launcher.config` and `launcher.result` are the job and
result types: the one place every floor may import from. Any other import from `loop/` or
`profiles/` into the launcher, or from `profiles/` into `loop/`, at module level or inside a
function, is an upward import and fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BASE = {"launcher.config", "launcher.result"}  # the job and result types, importable from every floor
FLOORS = {"launcher": 3, "loop": 2, "profiles": 1}


def floor_of(module: str) -> int | None:
    if module in BASE:
        return 0
    return FLOORS.get(module.split(".")[0])


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, module-level or not, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from launcher import config` imports launcher.config; `from loop.data import X` imports loop.data
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if floor_of(candidate) == 0 else base))
    return found


def upward_imports(root: Path = REPO) -> list[str]:
    problems = []
    for package, floor in FLOORS.items():
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            if module in BASE:
                continue
            for line, target in imported_modules(path, root):
                target_floor = floor_of(target)
                if target_floor is not None and target_floor > floor:
                    problems.append(f"{path.relative_to(root)}:{line}: {module} imports {target} (floor "
                                    f"{target_floor} above {floor})")
    return problems


def test_every_import_points_down():
    assert upward_imports() == []


def test_the_base_types_import_nothing_of_the_project():
    for module in BASE:
        path = REPO / (module.replace(".", "/") + ".py")
        assert [t for _, t in imported_modules(path) if floor_of(t) not in (None, 0)] == [], module


@pytest.mark.parametrize("source, expected", [
    ("from launcher.report import write_report\n", "loop/bad.py:1: loop.bad imports launcher.report"),
    ("def f():\n    import launcher.demo\n", "loop/bad.py:2: loop.bad imports launcher.demo"),
    ("from launcher import run\n", "loop/bad.py:1: loop.bad imports launcher"),
    ("from loop.train import train\n", "profiles/bad.py:1: profiles.bad imports loop.train"),
])
def test_the_scan_catches_an_upward_import(tmp_path, source, expected):
    for package in FLOORS:
        (tmp_path / package).mkdir()
    (tmp_path / "launcher" / "config.py").write_text("")
    (tmp_path / expected.split(":")[0]).write_text(source)
    problems = upward_imports(tmp_path)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_allowed_imports_pass(tmp_path):
    for package in FLOORS:
        (tmp_path / package).mkdir()
    (tmp_path / "loop" / "ok.py").write_text("from launcher.config import ConfigError\nfrom launcher import result\n"
                                             "from profiles import get_profile\nimport torch\n")
    (tmp_path / "launcher" / "cli.py").write_text("from loop.train import train\n")
    assert upward_imports(tmp_path) == []
