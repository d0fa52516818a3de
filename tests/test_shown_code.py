"""Show, then import (d2l's `#@save`): a lesson shows the code that sends its requests before it relies on it.

A notebook cell whose first line is `#@save streaming_tutorial/client/<module>.py` shows definitions that the
package keeps in that module; later cells and later lessons import the package's copy. These tests keep the two
the same, character for character, and check that each lesson shows a complete request in the open before it
calls a helper that sends one."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SAVE = re.compile(r"#@save (streaming_tutorial/client/\w+\.py)\n")
# A request in the open: the openai client, httpx or curl, written in the cell itself.
IN_THE_OPEN = re.compile(r"\.create\(|\.stream\(|\.post\(|\bcurl\b")
# The package's helpers that send requests. Each must be shown (#@save) before a lesson calls it, in that lesson or
# an earlier one; or, for the loops below, the request code they repeat must have been shown.
REQUEST_HELPERS = {"measure_stream", "stream_and_time", "closed_loop", "tokens_per_s", "long_prompt_beside_a_stream",
                   "timed_stream", "throughput_level", "prefix_cache_trial", "timed_reads"}
LOOPS_OVER = {"one_stream": "timed_stream", "ttft_by_prompt_length": "measure_stream", "drop_and_watch": "timed_reads"}
# vLLM's own benchmark client: the lesson prints its command line, its code is vLLM's.
NOT_OURS = {"vllm_bench"}
# The lessons that send requests through the package's helpers, each showing at least one of them.
SHOWING = ("04", "05", "08", "09")


def code_cells(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def shown_cells(path: Path) -> list[tuple[int, str, str]]:
    """(code cell index, module path, source) of each `#@save` cell."""
    return [(i, m.group(1), source) for i, source in enumerate(code_cells(path)) if (m := SAVE.match(source))]


def definitions(source: str) -> dict[str, str]:
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node) for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}


def calls(source: str, name: str) -> bool:
    """`source` calls `name` (its own definition, `def name(`, does not count)."""
    return re.search(rf"(?<!def )\b{name}\(", source) is not None


SHOWN = [(path, i, module, source) for path in NOTEBOOKS for i, module, source in shown_cells(path)]


@pytest.mark.parametrize(("path", "index", "module", "source"), SHOWN,
                         ids=[f"{p.name[:2]}-cell{i}-{m.rsplit('/', 1)[1]}" for p, i, m, _ in SHOWN])
def test_a_shown_cell_is_the_packages_code_character_for_character(path, index, module, source):
    tree = ast.parse(source)
    assert all(isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) for node in tree.body), (
        f"{path.name} code cell {index}: a #@save cell holds only definitions; run them in the next cell")
    package = importlib.import_module(module.removesuffix(".py").replace("/", "."))
    for name, text in definitions(source).items():
        assert hasattr(package, name), f"{path.name} code cell {index} shows {name}, which {module} does not have"
        kept = inspect.getsource(getattr(package, name)).rstrip()
        assert text == kept, (f"{path.name} code cell {index}: {name} differs from {module}'s; "
                              f"copy the package's into the cell (or the cell's into the package)")


def test_shown_cells_are_found():
    assert {path.name[:2] for path, *_ in SHOWN} >= set(SHOWING)
    assert len(SHOWN) >= 8


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_a_lesson_shows_a_request_before_a_helper_sends_one(path):
    earlier = {name for p in NOTEBOOKS if p.name < path.name for *_, source in shown_cells(p)
               for name in definitions(source)}
    shown = set(earlier)
    seen_in_the_open = False
    for i, source in enumerate(code_cells(path)):
        if SAVE.match(source):
            shown |= set(definitions(source))
        for name in REQUEST_HELPERS | set(LOOPS_OVER):
            if not calls(source, name) or (SAVE.match(source) and f"def {name}(" in source):
                continue
            assert seen_in_the_open, f"{path.name} code cell {i} calls {name} before any request in the open"
            needed = LOOPS_OVER.get(name, name)
            assert needed in shown, (f"{path.name} code cell {i} calls {name}, whose requests ({needed}) no cell "
                                     f"has shown yet: show it (#@save) first")
        for name in NOT_OURS:
            assert not calls(source, name) or seen_in_the_open, f"{path.name} code cell {i}: {name} first"
        seen_in_the_open = seen_in_the_open or IN_THE_OPEN.search(source) is not None
