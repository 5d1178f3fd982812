"""Layering of the ordering engine, read from the source with ``ast`` (nothing is imported or run).

The modules checked are every module of ``tfp_kernels/order/`` and ``tfp_kernels/distributed/order.py``; their
imports are every ``import`` / ``from ... import`` statement in them, at module level and inside functions
(a function-level import is a dependency too: it only runs later). The rules:

1. **order never imports distributed.** No module of ``tfp_kernels/order/`` imports ``tfp_kernels.distributed``
   or anything under it. (The sharded driver behind ``tfp_order(..., group=g)`` registers itself into the
   ordering layer when ``tfp_kernels.distributed`` is imported.)
2. **No import cycles among the modules of tfp_kernels/order/.** ``from tfp_kernels.order import m`` where
   ``m`` is a module of the package is a dependency on ``m``; any other name imported from the package
   ``tfp_kernels.order`` is a dependency on its ``__init__``.
3. **No private names across modules.** A name that starts with an underscore and is defined in a module is
   private to that module: no checked module imports it from another module of ``tfp_kernels``
   (``from m import _x``) or reads it as an attribute of an imported module (``m._x``). A module whose own
   name starts with an underscore (``tfp_kernels._ext``, ``tfp_kernels.order._checks``) is private to the
   package: other modules of the package may import it *as a module* (``from tfp_kernels.order import
   _checks``) and use its public names, never its private ones.
4. **Short functions.** No function (or method) is longer than :data:`MAX_FUNCTION_LINES` lines, its docstring
   not counted, except the Triton kernels (``@triton.jit``: one kernel is one launch; splitting it costs
   launches). The engine is components with small interfaces; a long function is where the next change goes
   wrong.
"""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

import pytest

import tfp_kernels

PACKAGE_ROOT = pathlib.Path(tfp_kernels.__file__).resolve().parent
ORDER_DIR = PACKAGE_ROOT / "order"
ORDER = "tfp_kernels.order"
DISTRIBUTED = "tfp_kernels.distributed"


@dataclass(frozen=True)
class Import:
    """One imported thing: ``target`` (the dotted module it comes from or is), ``name`` (the imported name,
    None for ``import m``), ``line`` and whether it sits inside a function."""

    source: str
    target: str
    name: str | None
    line: int
    in_function: bool


def module_name(path: pathlib.Path) -> str:
    """``tfp_kernels.order.fast`` for ``.../tfp_kernels/order/fast.py`` (a package for ``__init__.py``)."""
    parts = list(path.resolve().relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of ``tfp_kernels`` (a ``.py`` file or a folder)."""
    rel = pathlib.Path(*dotted.split(".")[1:]) if dotted != "tfp_kernels" else pathlib.Path()
    base = PACKAGE_ROOT / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def function_lines(tree: ast.AST) -> set[int]:
    """Lines of every import statement inside a function body."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    lines.add(inner.lineno)
    return lines


def imports_of(path: pathlib.Path) -> list[Import]:
    """Every import of ``tfp_kernels`` things in ``path``, relative imports resolved to absolute names."""
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    inner = function_lines(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tfp_kernels":
                    found.append(Import(source, alias.name, None, node.lineno, node.lineno in inner))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tfp_kernels":
                continue
            for alias in node.names:
                found.append(Import(source, target, alias.name, node.lineno, node.lineno in inner))
    return found


def dependency(imp: Import) -> str:
    """The module ``imp`` depends on: the submodule for ``from package import submodule``, else the target."""
    if imp.name is not None and is_module(f"{imp.target}.{imp.name}"):
        return f"{imp.target}.{imp.name}"
    return imp.target


def private_attribute_reads(path: pathlib.Path) -> list[str]:
    """``alias._x`` reads in ``path`` where ``alias`` is bound to a module of ``tfp_kernels`` by an import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tfp_kernels":
                    aliases.add(alias.asname or alias.name.split(".")[0])
    for imp in imports_of(path):
        if imp.name is not None and dependency(imp) != imp.target:  # a module imported by name
            aliases.add(imp.name)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{module_name(path)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def checked_files() -> list[pathlib.Path]:
    return sorted(ORDER_DIR.glob("*.py")) + [PACKAGE_ROOT / "distributed" / "order.py"]


def order_files() -> list[pathlib.Path]:
    return sorted(ORDER_DIR.glob("*.py"))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one node or a self edge (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def order_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in order_files():
        deps = graph.setdefault(module_name(path), set())
        for imp in imports_of(path):
            dep = dependency(imp)
            if dep == ORDER or dep.startswith(ORDER + "."):
                deps.add(dep)
    return graph


def test_the_checks_see_the_imports():
    # the parser finds what it must: relative imports resolved, function-level imports included
    fast = imports_of(ORDER_DIR / "fast.py")
    assert any(i.target == f"{ORDER}.band_topk" and not i.in_function for i in fast)
    assert any(i.in_function for i in fast)  # (fast.py imports the Triton kernels lazily)
    assert dependency(Import("x", ORDER, "inputs", 1, False)) == f"{ORDER}.inputs"
    assert dependency(Import("x", ORDER, "tfp_order", 1, False)) == ORDER
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_order_never_imports_distributed():
    bad = [f"{i.source}:{i.line}: imports {dependency(i)}" for path in order_files() for i in imports_of(path)
           if dependency(i) == DISTRIBUTED or dependency(i).startswith(DISTRIBUTED + ".")]
    assert not bad, "the ordering layer must not import tfp_kernels.distributed:\n" + "\n".join(bad)


def test_no_import_cycles_in_order():
    found = cycles(order_graph())
    assert not found, "import cycles among tfp_kernels.order's modules:\n" + "\n".join(" <-> ".join(c) for c in found)


#: Rule 4's limit.
MAX_FUNCTION_LINES = 120


def long_functions(path: pathlib.Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``"module:line: name (L lines)"`` of the functions of ``path`` longer than ``limit`` lines without their
    docstring (Triton kernels excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if any("jit" in ast.unparse(d) for d in node.decorator_list):
            continue
        lines = node.end_lineno - node.lineno + 1
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            lines -= first.end_lineno - first.lineno + 1
        if lines > limit:
            where = module_name(path) if PACKAGE_ROOT in path.resolve().parents else path.name
            found.append(f"{where}:{node.lineno}: {node.name} ({lines} lines)")
    return found


def test_the_length_check_counts_code_not_docstrings(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(5))
    doc = '    """' + "\n" * 10 + '    """\n'
    (tmp_path / "m.py").write_text(f"def f():\n{doc}{body}\n\n\n@triton.jit\ndef k():\n{body}\n")
    assert long_functions(tmp_path / "m.py", limit=6) == []
    assert len(long_functions(tmp_path / "m.py", limit=5)) == 1  # (f: 6 lines with its def, the kernel skipped)


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: module_name(p))
def test_functions_are_short(path):
    found = long_functions(path)
    assert not found, f"functions longer than {MAX_FUNCTION_LINES} lines (docstring excluded):\n" + "\n".join(found)


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: module_name(p))
def test_no_private_names_across_modules(path):
    bad = [f"{i.source}:{i.line}: from {i.target} import {i.name}" for i in imports_of(path)
           if i.name is not None and i.name.startswith("_") and dependency(i) == i.target]
    bad += private_attribute_reads(path)
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_tfp_order_with_a_group_reaches_the_sharded_driver():
    # the inversion keeps the public behaviour: importing tfp_kernels registers the sharded driver
    from tfp_kernels.distributed.order import tfp_order_sharded
    from tfp_kernels.order import api

    assert api.sharded_driver() is tfp_order_sharded


def test_tfp_order_with_a_group_calls_the_registered_driver(monkeypatch):
    import torch

    from tfp_kernels import tfp_order
    from tfp_kernels.order import api

    calls = []
    monkeypatch.setattr(api, "_sharded_order", lambda embeddings, **kwargs: calls.append((embeddings, kwargs)))
    rows, group = torch.randn(5, 3), object()
    tfp_order(rows, group=group, window=3)
    assert len(calls) == 1 and calls[0][0] is rows
    assert calls[0][1]["group"] is group and calls[0][1]["window"] == 3


def test_tfp_order_with_a_group_and_no_driver_says_so(monkeypatch):
    import torch

    from tfp_kernels import tfp_order
    from tfp_kernels.order import api

    monkeypatch.setattr(api, "_sharded_order", None)
    with pytest.raises(RuntimeError, match="sharded driver of tfp_kernels.distributed, which is not registered"):
        tfp_order(torch.randn(5, 3), group=object())
    with pytest.raises(TypeError, match="must be callable"):
        api.register_sharded_driver("tfp_order_sharded")
