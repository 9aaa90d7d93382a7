"""The Faust seam (app/bulk.py): the upstream code it was written against is still installed.

app/bulk.py copies, overrides and calls private parts of faust-streaming, mode and aiokafka; a
new version can change them without any other test failing at once. These tests compare a hash
of each such function's installed source with the one recorded in `app.bulk.UPSTREAM`, and check
that every private upstream name app/bulk.py uses is listed there with its reason.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import re
from pathlib import Path

from faust.utils import venusian as faust_venusian

from app import bulk
from app.bulk import UPSTREAM, WRITTEN_AGAINST

# The upstream modules whose private names app/bulk.py may use.
UPSTREAM_MODULES = (
    "faust.app.base",
    "faust.transport.consumer",
    "faust.transport.drivers.aiokafka",
    "mode.services",
    "mode.utils.queues",
    "aiokafka.consumer.consumer",
)


def installed_versions() -> str:
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in WRITTEN_AGAINST)


def test_the_overridden_upstream_functions_are_those_the_seam_was_written_against() -> None:
    changed = [
        f"- {upstream.function} (used for: {upstream.why}); re-check: {upstream.recheck}"
        for upstream in UPSTREAM
        if upstream.installed_sha256() != upstream.sha256
    ]
    assert not changed, (
        f"app/bulk.py was written against {WRITTEN_AGAINST}; installed: {installed_versions()}. "
        "These upstream functions changed:\n" + "\n".join(changed) + "\nThen record the new "
        "hashes in app.bulk.UPSTREAM (Upstream.installed_sha256()) and the new versions."
    )


def private_names(tree: ast.AST) -> set[str]:
    """Single-underscore names a module defines or reads as attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def test_every_upstream_private_name_the_seam_uses_is_listed_with_its_reason() -> None:
    upstream_source = "\n".join(
        inspect.getsource(importlib.import_module(module)) for module in UPSTREAM_MODULES
    )
    used = private_names(ast.parse(Path(bulk.__file__).read_text()))
    upstream_names = {name for name in used if re.search(rf"\b{name}\b", upstream_source)}
    listed = {name for upstream in UPSTREAM for name in upstream.names}
    assert upstream_names - listed == set(), "list these in app.bulk.UPSTREAM, with why"
    # And nothing listed that is no longer used: the list stays the seam's true extent.
    assert listed - used == set()


def test_the_app_never_discovers_so_its_decorators_leave_no_discovery_marks() -> None:
    """`skip_discovery_marks` is right only for an app that never runs `App.discover()`."""
    from app.main import app

    assert app.conf.autodiscover is False  # type: ignore[misc]  # a Param, as in App.__init__
    assert faust_venusian.attach.__module__ == bulk.__name__  # skip_discovery_marks() ran
    assert app.agents  # the decorators themselves still registered what they decorate
