"""The shared fixtures (testkit/fixtures.py) are defined once: a test module that defines a fixture
of the same name silently replaces it for its tests, with whatever type it likes. A module's own
wider fixtures keep its tests on one xdist process (testkit/scheduling.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import testkit.fixtures

TESTS = Path(__file__).parent


def fixture_scopes(path: Path) -> dict[str, str]:
    """The functions decorated with `pytest.fixture` (called or not) in a module, with their
    scope ("function" unless given; "dynamic" for a scope computed at run time)."""
    scopes: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if isinstance(target, ast.Attribute) and target.attr == "fixture":
                    given = [
                        keyword.value
                        for keyword in getattr(decorator, "keywords", [])
                        if keyword.arg == "scope"
                    ]
                    scope = given[0] if given else ast.Constant("function")
                    scopes[node.name] = (
                        str(scope.value) if isinstance(scope, ast.Constant) else "dynamic"
                    )
    return scopes


def fixtures_defined_in(path: Path) -> set[str]:
    return set(fixture_scopes(path))


def module_marks(path: Path) -> str:
    """The source of a module's `pytestmark = ...` ("" without one)."""
    source = path.read_text()
    return "".join(
        ast.get_source_segment(source, node.value) or ""
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
    )


def test_no_test_module_redefines_a_shared_fixture() -> None:
    shared = fixtures_defined_in(Path(testkit.fixtures.__file__))
    assert {"broker", "kafka", "topics", "fake_coingecko", "workers"} <= shared
    redefined = {
        f"{path.name}: {name}"
        for path in sorted(TESTS.glob("test_*.py"))
        for name in fixtures_defined_in(path) & shared
    }
    assert not redefined, f"fixtures shadowing testkit/fixtures.py: {sorted(redefined)}"


def test_a_module_with_a_fixture_wider_than_a_test_keeps_its_tests_in_one_xdist_group() -> None:
    """Under `./dev test` (pytest-xdist), each process that runs one of such a module's tests sets
    the fixture up again: a module-scoped worker started four times, or a session-wide report
    split over four processes."""
    ungrouped = sorted(
        f"{path.name}: {', '.join(sorted(wide))}"
        for path in TESTS.glob("test_*.py")
        if (wide := {name for name, scope in fixture_scopes(path).items() if scope != "function"})
        and "xdist_group" not in module_marks(path)
    )
    assert not ungrouped, (
        "add pytest.mark.xdist_group(<module name>) to these modules' pytestmark "
        f"(testkit/scheduling.py): {ungrouped}"
    )
