"""The shared fixtures (testkit/fixtures.py) are defined once: a test module that defines a fixture
of the same name silently replaces it for its tests, with whatever type it likes."""

from __future__ import annotations

import ast
from pathlib import Path

import testkit.fixtures

TESTS = Path(__file__).parent


def fixtures_defined_in(path: Path) -> set[str]:
    """Names of the functions decorated with `pytest.fixture` (called or not) in a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if isinstance(target, ast.Attribute) and target.attr == "fixture":
                    names.add(node.name)
    return names


def test_no_test_module_redefines_a_shared_fixture() -> None:
    shared = fixtures_defined_in(Path(testkit.fixtures.__file__))
    assert {"broker", "kafka", "topics", "fake_coingecko", "workers"} <= shared
    redefined = {
        f"{path.name}: {name}"
        for path in sorted(TESTS.glob("test_*.py"))
        for name in fixtures_defined_in(path) & shared
    }
    assert not redefined, f"fixtures shadowing testkit/fixtures.py: {sorted(redefined)}"
