"""The tree's layering: product code (backends/, client/) never imports the tests or the benchmarks, the
scripts do not reach into tests/, and the scripts and benchmarks keep their functions short."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
NOT_PRODUCT = {"mm_bench", "harness", "reliability", "conftest", "tests", "benchmarks"}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_product_code_imports_neither_tests_nor_benchmarks():
    files = [*ROOT.glob("backends/**/*.py"), *ROOT.glob("client/**/*.py")]
    assert len(files) > 50
    bad = {str(f.relative_to(ROOT)): sorted(_imported_modules(f) & NOT_PRODUCT) for f in files}
    assert not {f: m for f, m in bad.items() if m}


def test_only_product_directories_are_packaged():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["where"] == ["backends", "client"]


def test_scripts_do_not_put_tests_on_the_path():
    for path in [*ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")]:
        text = path.read_text()
        assert not re.search(r"""sys\.path.*["']tests["']""", text), path
        assert not ({"harness", "reliability", "conftest"} & _imported_modules(path)), path


def test_script_and_benchmark_functions_stay_short():
    long = []
    for path in [*ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 65:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long
