"""Safety: static checks over the repository's Python sources, and inputs that must not run code.

    pytest tests/reliability/test_safety.py -q

Static (AST, so strings and comments never match): every `torch.load(` passes `weights_only=True`; no
`subprocess` call uses `shell=True` (nor the always-shell helpers); no `os.system`/`os.popen`; no
builtin `eval(`/`exec(`; no unpickling (`pickle.load(s)`); YAML only through `yaml.safe_load`;
no literal `trust_remote_code=True`. A call that needs an exception goes into ALLOWLIST with its
reason. Attacks, each leaving a file behind if its code ran: a model folder whose config points at
its own Python code (not run unless `model.trust_remote_code = true`), pickled weights with a payload,
a chat template that reaches for `os`, and a `profile.name` that points at something that is not a
profile class ("os:system", "builtins:eval", "nonexistent.module:X", ...), refused with exit 2 and a
message, importing nothing but the module it names.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
from pathlib import Path

import pytest

from helpers import REPO, PicklePayload, model_with_remote_code, run_cli, small_job
from launcher.cli import main

SKIP_DIRS = {".venv", "venv", ".git", "__pycache__", "build", "dist", ".eggs", "node_modules", ".mypy_cache",
             ".pytest_cache", ".tox"}
# (path relative to the repository, the call as written) -> why it is acceptable.
ALLOWLIST: dict[tuple[str, str], str] = {}

SUBPROCESS_FUNCTIONS = {"run", "Popen", "call", "check_call", "check_output"}
ALWAYS_SHELL = {("subprocess", "getoutput"), ("subprocess", "getstatusoutput"), ("os", "system"), ("os", "popen"),
                ("asyncio", "create_subprocess_shell"), ("pty", "spawn")}


def python_sources() -> list[Path]:
    files = []
    for folder, subfolders, names in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if d not in SKIP_DIRS and not d.endswith(".egg-info")
                         and not (Path(folder, d) / "pyvenv.cfg").exists()]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def dotted(node: ast.AST) -> str:
    """`torch.load` for an attribute chain, `eval` for a name, "" otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def problems_in(path: Path) -> list[str]:
    rel = str(path.relative_to(REPO))
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=rel)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)

        def report(problem: str, node=node, name=name) -> None:
            text = ast.get_source_segment(source, node) or name  # slow on big files: only when reporting
            if (rel, text) not in ALLOWLIST:
                found.append(f"{rel}:{node.lineno}: {text.splitlines()[0][:120]}  <- {problem}")

        if name == "torch.load" and not is_true(keyword(node, "weights_only")):
            report("torch.load without weights_only=True unpickles arbitrary code")
        if name.startswith("subprocess.") and name.split(".")[-1] in SUBPROCESS_FUNCTIONS:
            shell = keyword(node, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                report("subprocess with shell=... : pass an argument list instead")
        if tuple(name.split(".")[-2:]) in ALWAYS_SHELL:
            report("runs a shell command line: use subprocess with an argument list")
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            report("eval/exec runs arbitrary code")
        if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "joblib.load"):
            report("unpickling runs arbitrary code: use JSON or safetensors")
        if name in ("yaml.load", "yaml.load_all"):
            loader = dotted(keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else ast.Constant(None)))
            if not loader.endswith("SafeLoader"):
                report("yaml.load without a SafeLoader: use yaml.safe_load")
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            report("unsafe YAML loader: use yaml.safe_load")
        if is_true(keyword(node, "trust_remote_code")):
            report("trust_remote_code=True hard-coded: it must come from model.trust_remote_code (default false)")
    return found


def test_no_unsafe_calls_in_the_sources():
    import loop.model

    sources = python_sources()
    assert Path(loop.model.__file__).resolve() in sources  # the scan reaches the code that loads weights
    problems = [problem for path in sources for problem in problems_in(path)]
    assert not problems, "unsafe calls (fix them, or add them to ALLOWLIST with a reason):\n" + "\n".join(problems)


def test_the_checker_finds_what_it_looks_for(tmp_path, monkeypatch):
    """Guards the static test above against checking nothing."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os, pickle, subprocess, torch, yaml\n"
        "torch.load('x')\n"
        "torch.load('x', weights_only=False)\n"
        "subprocess.run('ls', shell=True)\n"
        "subprocess.check_output(cmd, shell=flag)\n"
        "os.system('ls')\n"
        "eval(data)\n"
        "exec(code)\n"
        "pickle.loads(blob)\n"
        "yaml.load(text)\n"
        "Model.from_pretrained(p, trust_remote_code=True)\n"
        "# fine:\n"
        "torch.load('x', weights_only=True)\n"
        "subprocess.run(['ls'], shell=False)\n"
        "model.eval()\n"
        "yaml.load(text, Loader=yaml.SafeLoader)\n"
        "yaml.safe_load(text)\n"
        "s = 'os.system(1); eval(2)'\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    problems = problems_in(bad)
    assert [int(p.split(":")[1]) for p in problems] == list(range(2, 12)), "\n".join(problems)


# --- attacks that would leave a file behind -------------------------------------------------------------

def test_a_model_folders_own_code_never_runs_by_default(tmp_path, tiny_model_dir, capsys):
    """config.json may name Python files of the folder (`auto_map`); by default the built-in class loads instead."""
    ran = tmp_path / "remote-code-ran"
    model = model_with_remote_code(tiny_model_dir, tmp_path / "model", ran)
    code, out, err = run_cli(["run", small_job(tmp_path, model, **{"hyperparams.max_steps": 1})], capsys)
    assert code == 0, err[-2000:]
    assert not ran.exists(), "the model folder's code ran without model.trust_remote_code"


def test_pickled_weights_with_a_payload_are_refused_without_running_it(tmp_path, tiny_model_dir, capsys):
    import torch
    from safetensors.torch import load_file

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    ran = tmp_path / "pickle-ran"
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save({**weights, "extra": PicklePayload(ran)}, model / "pytorch_model.bin")
    code, out, err = run_cli(["run", small_job(tmp_path, model)], capsys)
    assert code != 0, out[-2000:]
    assert not ran.exists(), "the pickled weights ran code"
    assert not (tmp_path / "out").exists()  # refused before the output folder was touched


def test_a_chat_template_that_reaches_for_os_is_refused(tmp_path, tiny_model_dir, capsys):
    """Templates render in transformers' Jinja sandbox: attribute walks to `os` raise instead of running."""
    ran = tmp_path / "template-ran"
    (tmp_path / "template.jinja").write_text(
        f"{{{{ cycler.__init__.__globals__.os.system('touch {ran}') }}}}"
        "{% for m in messages %}{{ m.content }}{% endfor %}")
    code, out, err = run_cli(["validate", small_job(tmp_path, tiny_model_dir, **{
        "data.chat_template": "template.jinja"})], capsys)
    assert code == 2 and "SecurityError" in err and "Traceback" not in out + err, err[-2000:]
    assert not ran.exists(), "the chat template ran a shell command"


# --- profile names ---------------------------------------------------------------------------------------

MARKER_MODULE = "reliability_import_marker"


@pytest.mark.parametrize("name,expected", [
    ("os:system", ["profile.name", "'os:system' is not a profile class"]),
    ("builtins:eval", ["profile.name", "is not a profile class"]),
    ("subprocess:Popen", ["profile.name", "is not a profile class"]),
    ("os.path:join", ["profile.name", "is not a profile class"]),
    ("nonexistent.module:X", ["profile.name", "cannot import 'nonexistent.module'", "PYTHONPATH"]),
    ("json:NoSuchClass", ["profile.name", "module 'json' has no class 'NoSuchClass'"]),
    ("os", ["profile.name", "unknown profile 'os'"]),
    (":X", ["profile.name", '"pkg.module:Class"']),
    ("json:", ["profile.name", '"pkg.module:Class"']),
])
def test_a_profile_name_that_is_not_a_profile_class_is_refused(tmp_path, tiny_model_dir, capsys, name, expected):
    job = small_job(tmp_path, tiny_model_dir, **{"profile.name": name})
    # A module next to the job file, which no profile name here names: it must not be imported.
    (tmp_path / f"{MARKER_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(tmp_path / 'imported')!r}).write_text('imported')\n")
    path_before = list(sys.path)
    code = main(["validate", str(job)])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2, text[-2000:]
    assert all(s in text for s in expected), text[-2000:]
    assert "Traceback" not in text
    assert not (tmp_path / "imported").exists(), "a module the profile name does not name was imported"
    assert MARKER_MODULE not in sys.modules
    assert sys.path == path_before, "the job's folder was left on sys.path"
    assert not (tmp_path / "out").exists()


def test_a_custom_profile_is_imported_from_the_named_module_only(tmp_path, tiny_model_dir, capsys):
    """The named module next to the job file is imported (that is its purpose) and trains; nothing else is."""
    (tmp_path / "my_profiles.py").write_text(
        "from profiles import ChatProfile\n\nclass Shouting(ChatProfile):\n"
        "    def messages(self, example, index):\n"
        "        return [dict(m, content=m['content'].upper()) for m in super().messages(example, index)]\n")
    (tmp_path / f"{MARKER_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(tmp_path / 'imported')!r}).write_text('imported')\n")
    job = small_job(tmp_path, tiny_model_dir, **{"profile.name": "my_profiles:Shouting"})
    path_before = list(sys.path)
    try:
        code = main(["validate", str(job)])
        text = capsys.readouterr().out
        assert code == 0 and "the job is valid" in text
        assert "HERE IS A SHORT ANSWER ABOUT" in text  # the rendered example went through the profile
        assert not (tmp_path / "imported").exists()
        assert sys.path == path_before
    finally:
        sys.modules.pop("my_profiles", None)
