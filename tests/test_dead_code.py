"""No dead code: every module-level function and class of normbench/ and scripts/ is used somewhere.

"Used" is a reference to its name anywhere but in its own definition: a name or attribute in the
code of normbench/, scripts/ or tests/ (an import counts; comments and docstrings do not), a
string of that code (monkeypatch.setattr(module, "name"), getattr), or a word of the files that
name code from outside Python: pyproject.toml (console scripts), conf/ (Hydra `_target_`s and
callbacks), the Makefile and the shell scripts. A name reached only in another way is an entry
point and goes in ENTRY_POINTS, with the reason.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED = [*sorted((REPO / "normbench").rglob("*.py")), *sorted((REPO / "scripts").glob("*.py"))]
PYTHON = [*CHECKED, *sorted((REPO / "tests").rglob("*.py"))]
OTHER = [REPO / "pyproject.toml", REPO / "Makefile", *sorted((REPO / "conf").rglob("*.yaml")),
         *sorted((REPO / "scripts").glob("*.sh"))]
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Module-level names used only from outside this repository's code and configuration, each with why.
ENTRY_POINTS: dict[str, str] = {}


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string constants that are docstrings (of a module, class or function)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _references(tree: ast.AST):
    """(name, line) of every reference in a module: names, attributes, imported names, words of strings."""
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id, node.lineno
        elif isinstance(node, ast.Attribute):
            yield node.attr, node.lineno
        elif isinstance(node, ast.alias):
            yield node.name.rsplit(".", 1)[-1], node.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            for word in WORD.findall(node.value):
                yield word, node.lineno


def module_level_definitions() -> list[tuple[Path, ast.AST]]:
    found = []
    for path in CHECKED:
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("__"):
                found.append((path, node))
    return found


def unused_definitions() -> list[str]:
    references: dict[str, list[tuple[Path, int]]] = defaultdict(list)
    for path in PYTHON:
        for name, line in _references(ast.parse(path.read_text(), str(path))):
            references[name].append((path, line))
    words = {word for path in OTHER if path.exists() for word in WORD.findall(path.read_text())}
    unused = []
    for path, node in module_level_definitions():
        name = node.name
        if name in ENTRY_POINTS or name in words:
            continue
        outside = [(p, line) for p, line in references.get(name, [])
                   if not (p == path and node.lineno <= line <= node.end_lineno)]  # recursion is no use
        if not outside:
            shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            unused.append(f"{shown}:{node.lineno} {name}")
    return unused


def test_every_module_level_function_and_class_is_used():
    unused = unused_definitions()
    assert not unused, "defined but used nowhere (remove it, or list a true entry point in ENTRY_POINTS):\n  " + \
        "\n  ".join(unused)


def test_the_check_finds_an_unused_function(tmp_path, monkeypatch):
    """The check itself: a function no code names is reported, one that some code calls is not."""
    module = tmp_path / "normbench" / "probe.py"
    module.parent.mkdir()
    module.write_text('"""probe_unused_helper in a docstring is no use."""\n\n\n'
                      "def probe_unused_helper():\n    return probe_unused_helper()  # recursion is no use\n\n\n"
                      "def probe_used_helper():\n    return 1\n\n\nVALUE = probe_used_helper()\n")
    monkeypatch.setattr(sys.modules[__name__], "CHECKED", [module])
    monkeypatch.setattr(sys.modules[__name__], "PYTHON", [module])
    assert unused_definitions() == [f"{module}:4 probe_unused_helper"]
