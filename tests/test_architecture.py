"""The package's shape: no import cycles, the maths imports only torch, files readable in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf_lightning"
MATHS = ("logprobs", "losses", "advantages")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Package modules imported at module level (not inside functions or TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - sub.level + 1] + [base]).strip(".")
                found.add(base)
                found |= {f"{base}.{a.name}" for a in sub.names}
    return {m for m in found if m.startswith("rlhf_lightning")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def test_no_import_cycles():
    graph = _graph()
    visiting, done = [], set()

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join(visiting[visiting.index(node) :] + [node])
        visiting.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        visiting.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_cycle_detector_finds_a_cycle(tmp_path, monkeypatch):
    # The check above must be able to fail: a two-module loop is reported.
    pkg = tmp_path / "rlhf_lightning"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from rlhf_lightning import b\n")
    (pkg / "b.py").write_text("import rlhf_lightning.a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as err:
        assert "rlhf_lightning.a -> rlhf_lightning.b -> rlhf_lightning.a" in str(err)
    else:
        raise AssertionError("the cycle a -> b -> a was not found")


def test_maths_imports_only_torch():
    for name in MATHS:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots.add("." if node.level else node.module.split(".")[0])
        extra = roots - {"torch", "__future__", "math", "typing", "collections", "dataclasses", "."}
        assert not extra, f"{name}.py imports {extra}"
        if "." in roots:  # relative imports stay inside the maths layer
            rel = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
            assert rel <= set(MATHS), f"{name}.py imports {rel}"


def test_every_file_readable_in_one_sitting():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_every_package_directory_is_shipped():
    # pyproject.toml lists the packages explicitly (configs/ is mapped into the package).
    import re

    text = (PACKAGE.parent / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(rlhf_lightning[\w.]*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    on_disk = {_module_name(p) for p in PACKAGE.rglob("__init__.py")} | {"rlhf_lightning.configs"}
    assert listed == on_disk
