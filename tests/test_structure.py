"""The package structure ARCHITECTURE.md promises, checked on the source (ast, no imports run):

1. **No import cycle** anywhere in the tree (activation_cache, trainer, sweep, bench, tests):
   every ``import`` / ``from ... import`` counts, at module level or inside a function, except
   those under ``if TYPE_CHECKING:`` (which never run).
2. **Nothing outside ``trainer/saes/`` and ``trainer/registry.py`` knows the architectures**:
   in the Python code of activation_cache/, trainer/ and sweep/, no string literal names a
   registered architecture (``"batchtopk"``...: dispatch on names is a string comparison), and
   no identifier (a name, an attribute, a keyword, a parameter) nor any string literal uses a
   field an architecture owns (``top_k``, ``threshold_beta``...: reading an architecture's
   setting). Docstrings and comments may mention them (they explain, they do not dispatch);
   YAML files, README/ARCHITECTURE, tests and bench may too.

Both checks are tested against planted violations, so they cannot pass vacuously.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("activation_cache", "trainer", "sweep")
SCRIPT_DIRS = ("bench", "tests")
KNOWN_CYCLES: set[frozenset[str]] = set()
"""Cycles tolerated for now (none: keep it empty; the test fails while an entry is stale)."""


# -- the import graph -------------------------------------------------------------------------


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the tree (a package's
    ``__init__.py`` under the package's name)."""
    out: dict[str, Path] = {}
    for top in PACKAGES + SCRIPT_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the statements under ``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else (
                test.attr if isinstance(test, ast.Attribute) else None)
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    skip.update(id(n) for n in ast.walk(stmt))
    return skip


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the tree that ``module`` imports (anywhere in it but TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    # scripts in bench/ and tests/ import their siblings by bare name (sys.path)
    sibling_dir = module.rpartition(".")[0] if module.split(".")[0] in SCRIPT_DIRS else None
    found: set[str] = set()

    def add(name: str) -> None:
        if name in modules and name != module:
            found.add(name)
        elif sibling_dir and f"{sibling_dir}.{name}" in modules:
            found.add(f"{sibling_dir}.{name}")

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".") if package else []
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                if f"{base}.{alias.name}" in modules:
                    add(f"{base}.{alias.name}")
                else:
                    add(base)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_there_is_no_import_cycle():
    found = cycles(import_graph(module_files()))
    unknown = [c for c in found if frozenset(c) not in KNOWN_CYCLES]
    assert not unknown, "import cycles: " + "; ".join(" <-> ".join(c) for c in unknown)
    stale = [sorted(k) for k in KNOWN_CYCLES if list(sorted(k)) not in found]
    assert not stale, f"KNOWN_CYCLES lists cycles that are gone now; remove them: {stale}"


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    """A function-level import closing a loop is a cycle; one under TYPE_CHECKING is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from .d import y\n")
    (pkg / "d.py").write_text("from .c import z\n")
    modules = {f"pkg.{p.stem}" if p.stem != "__init__" else "pkg": p for p in pkg.glob("*.py")}
    assert cycles(import_graph(modules)) == [["pkg.a", "pkg.b"]]


# -- architecture names and fields outside the registry --------------------------------------


def _forbidden() -> tuple[set[str], set[str]]:
    import trainer

    catalog = trainer.field_catalog()
    return set(catalog.architectures), set(catalog.architecture_fields)


def _docstring_ids(tree: ast.AST) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.add(id(body[0].value))
        # attribute docstrings: a bare string right after an assignment
        for field in ("body", "orelse"):
            stmts = getattr(node, field, None)
            if not isinstance(stmts, list):
                continue
            for prev, stmt in zip(stmts, stmts[1:]):
                if isinstance(prev, (ast.Assign, ast.AnnAssign)) and isinstance(stmt, ast.Expr) \
                        and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                    out.add(id(stmt.value))
    return out


def violations(source: str, where: str, names: set[str], fields: set[str]) -> Iterator[str]:
    """Uses of an architecture name (string literals) or an architecture field (identifiers and
    string literals) in ``source``, docstrings left out."""
    tree = ast.parse(source, where)
    docs = _docstring_ids(tree)
    words = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        ident = None
        if isinstance(node, ast.Name):
            ident = node.id
        elif isinstance(node, ast.Attribute):
            ident = node.attr
        elif isinstance(node, ast.keyword):
            ident = node.arg
        elif isinstance(node, ast.arg):
            ident = node.arg
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            ident = node.name
        if ident is not None and ident in fields:
            yield f"{where}:{line}: identifier {ident!r} is an architecture's field"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            tokens = set(words.findall(node.value))
            for hit in sorted(tokens & names):
                yield f"{where}:{line}: string {node.value!r} names architecture {hit!r}"
            for hit in sorted(tokens & fields):
                yield f"{where}:{line}: string {node.value!r} names architecture field {hit!r}"


def checked_files() -> Iterable[Path]:
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("trainer/saes/") or rel == "trainer/registry.py":
                continue
            yield path


def test_no_architecture_name_or_field_outside_the_registry_and_saes():
    names, fields = _forbidden()
    assert {"batchtopk", "topk"} <= names and {"top_k", "threshold_beta"} <= fields
    found = [v for path in checked_files()
             for v in violations(path.read_text(), path.relative_to(ROOT).as_posix(), names,
                                 fields)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("planted, what", [
    ("def f(cfg):\n    return cfg.architecture == 'batchtopk'\n", "names architecture"),
    ("def f(cfg):\n    return cfg.top_k + 1\n", "identifier 'top_k'"),
    ("def f(d):\n    return d.get('threshold_beta')\n", "names architecture field"),
    ("def f(build):\n    return build(top_k=4)\n", "identifier 'top_k'"),
    ("MSG = f'set top_k in {1}'\n", "names architecture field"),
])
def test_the_name_check_finds_a_planted_violation(planted, what):
    names, fields = _forbidden()
    assert any(what in v for v in violations(planted, "planted.py", names, fields))


def test_the_name_check_leaves_docstrings_alone():
    names, fields = _forbidden()
    source = ('"""BatchTopK (batchtopk) keeps top_k per token."""\n'
              'X = 1\n"""top_k again, an attribute docstring."""\n'
              'def f():\n    """top_k."""\n    return 0\n')
    assert list(violations(source, "ok.py", names, fields)) == []
