"""Nothing unsafe is loaded or served (issue 5, STYLE rule 13).

* The source tree (entropy_core/, tasks/, flows/, benchmarks/, tests/) is read with `ast`, so calls that span
  lines and names inside strings are judged correctly: no pickle-family import (pickle, _pickle, cPickle,
  cloudpickle, dill, shelve), no `torch.load` without `weights_only=True`, no `yaml.load` whose Loader is not
  a SafeLoader (yaml.SafeLoader itself, or a class of the same file derived from it), no yaml.unsafe_load /
  full_load, no `numpy.load(allow_pickle=True)`, no builtin `eval` / `exec`. Shell scripts are grepped for
  the same.
* The Prefect UI is local unless the user says otherwise: the README's and the flow's `prefect server start`
  bind 127.0.0.1 (a public bind appears only in the README's multi-node cluster instructions, which say so),
  `--serve` starts no webserver, and Prefect's runner webserver would bind localhost anyway.
"""
import ast
import os
import re
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_HOME", __import__("tempfile").mkdtemp(prefix="entropy-core-prefect-home-"))
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SCANNED = ("entropy_core", "tasks", "flows", "benchmarks", "tests")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}


def _python_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)


def _name(node: ast.AST) -> str:
    """Dotted name of a Name / Attribute chain ('torch.load'), '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _safe_loaders(tree: ast.Module) -> set[str]:
    """SafeLoader plus every class of this file derived (directly or through others here) from one."""
    safe, changed = set(SAFE_YAML_LOADERS), True
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    while changed:
        changed = False
        for c in classes:
            if c.name not in safe and any(_name(b).split(".")[-1] in safe for b in c.bases):
                safe.add(c.name)
                changed = True
    return safe


def _problems(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    safe_loaders, out = _safe_loaders(tree), []

    def where(node):
        return f"{path.relative_to(root)}:{node.lineno}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"{where(node)}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in PICKLE_MODULES:
                out.append(f"{where(node)}: from {node.module} import ...")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                out.append(f"{where(node)}: from torch import load (use torch.load(..., weights_only=True))")
            if node.module == "yaml" and any(a.name in ("load", "unsafe_load", "full_load") for a in node.names):
                out.append(f"{where(node)}: from yaml import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Call):
            fn = _name(node.func)
            if fn in ("eval", "exec"):
                out.append(f"{where(node)}: {fn}(...)")
            elif fn == "torch.load":
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    out.append(f"{where(node)}: torch.load without weights_only=True")
            elif fn in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _name(loader).split(".")[-1] not in safe_loaders:
                    out.append(f"{where(node)}: {fn} without a SafeLoader")
            elif fn in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                out.append(f"{where(node)}: {fn}")
            elif fn in ("np.load", "numpy.load"):
                ap = _kw(node, "allow_pickle")
                if not (ap is None or (isinstance(ap, ast.Constant) and ap.value is False)):
                    out.append(f"{where(node)}: {fn} with allow_pickle")
    return out


def test_no_unsafe_deserialisation_or_eval_in_python_sources():
    files = _python_files()
    assert len(files) > 40, "the scan found too few files; did the layout change?"
    problems = [p for f in files for p in _problems(f)]
    assert not problems, f"{len(problems)} unsafe calls or imports:\n" + "\n".join(problems)


def test_the_scan_catches_what_it_should(tmp_path):
    """The checker itself, on a file holding every pattern (so a silent checker cannot pass the test above)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport cloudpickle as cp\nfrom dill import loads\nimport torch, yaml\n"
                   "import numpy as np\n"
                   "torch.load('a')\ntorch.load('a', weights_only=False)\n"
                   "torch.load(\n    'a',\n    map_location='cpu',\n)\n"
                   "yaml.load('a')\nyaml.load('a', Loader=yaml.Loader)\nyaml.unsafe_load('a')\n"
                   "np.load('a', allow_pickle=True)\neval('1')\nexec('x = 1')\n"
                   "class L(yaml.SafeLoader):\n    pass\n"
                   "yaml.load('a', Loader=L)\ntorch.load('a', weights_only=True)\nmodel.eval()\n")
    found = _problems(bad, root=tmp_path)
    assert len(found) == 12, "\n".join(found)
    assert not any(p.startswith(f"bad.py:{n}:") for p in found for n in (20, 21, 22)), found   # the safe forms pass


def test_no_unsafe_deserialisation_in_shell_scripts():
    pattern = re.compile(r"\bimport\s+(c?pickle|cloudpickle|dill)\b|\bpickle\.loads?\(|yaml\.(unsafe_|full_)?load\(|"
                         r"\beval\(|torch\.load\((?![^)]*weights_only\s*=\s*True)")
    hits = []
    for d in SCANNED:
        for p in (ROOT / d).rglob("*.sh"):
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


# ------------------------------------------------------------------------------------------------ the UI
def test_readme_and_flow_bind_the_prefect_server_to_localhost():
    for path in (ROOT / "README.md", ROOT / "flows" / "measure.py"):
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if "prefect server start" in ln]
        assert lines, f"{path.name} shows no `prefect server start` command"
        for ln in lines:
            if "--host 0.0.0.0" in ln:       # only as the explicit multi-node (cluster) instruction
                assert "node" in ln, f"{path.name}: a public bind outside the cluster instructions: {ln.strip()}"
            else:
                assert "--host 127.0.0.1" in ln, f"{path.name}: {ln.strip()}"
        assert any("--host 127.0.0.1" in ln for ln in lines), f"{path.name}: no local `prefect server start`"
    for d in ("entropy_core", "tasks", "flows", "configs"):
        for p in (ROOT / d).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".md"):
                assert "0.0.0.0" not in p.read_text(encoding="utf-8"), f"{p} binds every interface"


def test_serve_starts_no_public_webserver(monkeypatch, capsys):
    from prefect.settings import PREFECT_RUNNER_SERVER_HOST

    from flows import measure as cli
    seen = {}
    monkeypatch.setattr(cli.measure, "serve", lambda **kwargs: seen.update(kwargs))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert cli.main(["--serve", "--config", str(ROOT / "configs" / "demo.yaml")]) == 0
    assert seen and seen.get("webserver", False) is False, seen
    assert "--host 127.0.0.1" in capsys.readouterr().err           # the note says how to start the UI locally
    # if a user turns the runner's webserver on, Prefect binds it to this host: local unless configured
    assert PREFECT_RUNNER_SERVER_HOST.value() in ("localhost", "127.0.0.1")


@pytest.mark.parametrize("flow_file", sorted((ROOT / "flows").glob("*.py")), ids=lambda p: p.name)
def test_no_flow_passes_webserver_true(flow_file):
    tree = ast.parse(flow_file.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            ws = _kw(node, "webserver")
            assert not (isinstance(ws, ast.Constant) and ws.value), f"{flow_file.name}:{node.lineno}: webserver=True"
