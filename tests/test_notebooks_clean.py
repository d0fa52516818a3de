"""The notebooks are committed as lessons, not as results: no outputs, no execution counts, a title cell,
and the conventions every notebook follows (server from the environment, stopped at the end)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def test_the_numbered_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(1, len(names) + 1)], names  # 01, 02, ... no gap
    assert len(names) >= 6, names
    assert all(re.fullmatch(r"\d\d-[a-z0-9-]+\.ipynb", n) for n in names), names


@pytest.fixture(params=NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def notebook(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_valid_and_without_outputs(notebook):
    path, nb = notebook
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs: strip them before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
        assert "attachments" not in cell or not cell["attachments"], f"{path.name} cell {i} has attachments"


def test_no_execution_metadata(notebook):
    path, nb = notebook
    for i, cell in enumerate(nb.cells):
        assert "execution" not in cell.get("metadata", {}), f"{path.name} cell {i} keeps execution timings"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", path.name


def test_starts_with_a_title_that_says_what_and_how_long(notebook):
    path, nb = notebook
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.name[:2]} · "), path.name
    assert "You will learn" in first.source and "Time:" in first.source, path.name


def test_server_comes_from_the_environment_and_is_stopped(notebook):
    path, nb = notebook
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "plt.show(block" not in code and "time.sleep(5" not in code
    if path.name.startswith("01"):
        assert "stop_with_kernel(" in code and "os.killpg(" in code  # starts and stops its own server
    elif path.name.startswith("07"):  # its own cluster (processes/cluster.py), tied to the kernel, stopped
        last_code = [c.source for c in nb.cells if c.cell_type == "code"][-1]
        assert "on_launch=stop_with_kernel" in code and "cluster.stop()" in last_code
    else:
        assert "connect()" in code, f"{path.name} must get its server from streaming_tutorial.client.notebook.connect"
        assert nb.cells[-1].source.strip().endswith("conn.close()  # stops the server only if this notebook "
                                                    "started it"), f"{path.name} must end by closing its server"


MAX_CELL_LINES = 29


def test_every_cell_is_short(notebook):
    """One idea per cell: what a lesson does not teach (plotting boilerplate, table formatting, retry loops)
    belongs in streaming_tutorial/client/, not in a long cell."""
    path, nb = notebook
    lines = {i: len(cell.source.splitlines()) for i, cell in enumerate(nb.cells)}
    long = {i: n for i, n in lines.items() if n > MAX_CELL_LINES}
    assert not long, f"{path.name}: cells longer than {MAX_CELL_LINES} lines (cell: lines): {long}"


def test_sections_are_numbered_in_order(notebook):
    path, nb = notebook
    numbers = [int(n) for c in nb.cells if c.cell_type == "markdown"
               for n in re.findall(r"^## (\d+)\.", c.source, flags=re.MULTILINE)]
    assert numbers == list(range(1, len(numbers) + 1)), f"{path.name}: sections {numbers}"
