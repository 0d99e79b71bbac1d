"""The layout's rules, read from the code: who may import whom, how long a function may be,
and that the layout documented in README.md and docs/layout.md is the tree's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "server", "client", "simulations", "proto")
#: package -> the project packages it must never import
FORBIDDEN = {
    "server": {"client", "simulations"},
    "client": {"server", "simulations"},
    "common": {"server", "client", "simulations"},
    "proto": {"common", "server", "client", "simulations"},
}
MAX_FUNCTION_LINES = 60


def sources(package: str, *, generated: bool = False) -> list[Path]:
    """The package's modules, the generated protobuf ones only if asked."""
    return sorted(p for p in (ROOT / package).rglob("*.py")
                  if generated or not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in the file, at any depth (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_never_imports_the_ones_above_or_beside_it(package: str) -> None:
    breaches = [f"{path.relative_to(ROOT)} imports {name}"
                for path in sources(package)
                for name in sorted(imported_packages(path) & FORBIDDEN[package])]
    assert breaches == []


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Lines of a function that are neither blank, comments, nor its docstring."""
    skip: set[int] = set()
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        skip = set(range(first.lineno, first.end_lineno + 1))
    return sum(1 for number in range(node.lineno, node.end_lineno + 1)
               if number not in skip and lines[number - 1].strip()
               and not lines[number - 1].strip().startswith("#"))


def test_code_lines_counts_neither_docstrings_nor_comments_nor_blank_lines() -> None:
    text = 'def f(x):\n    """Doc\n    string."""\n\n    # why\n    y = x\n    return y\n'
    assert code_lines(ast.parse(text).body[0], text.splitlines()) == 3  # def, y = x, return


@pytest.mark.parametrize("package", ["server", "client"])
def test_every_function_of_the_federation_sides_reads_at_once(package: str) -> None:
    long = []
    for path in sources(package):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(node, lines)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert long == [], f"over {MAX_FUNCTION_LINES} lines of code"


def table_paths(text: str) -> set[str]:
    """The paths named in the first cell of a markdown table's rows: | `path` | ... |"""
    return set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE))


def test_the_layout_in_the_docs_is_the_tree() -> None:
    files = {str(p.relative_to(ROOT)) for package in PACKAGES
             for p in sources(package, generated=True) if p.name != "__init__.py"}
    documented = {p for p in table_paths((ROOT / "docs" / "layout.md").read_text()) if p.endswith(".py")}
    assert sorted(documented - files) == [], "documented in docs/layout.md, not in the tree"
    assert sorted(files - documented) == [], "in the tree, not in docs/layout.md"


def test_the_readme_layout_names_every_top_level_folder() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    folders = {p.rstrip("/") for p in table_paths(section)}
    assert folders >= set(PACKAGES) | {"bench", "tests", "docs"}
    assert all((ROOT / folder).is_dir() for folder in folders)
