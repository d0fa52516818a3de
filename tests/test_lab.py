"""Notebook 02 as a learner meets it: in JupyterLab, in a real browser (issue 27).

nbmake runs the notebooks' kernels headless, so it cannot see what JupyterLab shows: a kernel-selection dialog,
an output that does not render, a wall of text. Here JupyterLab is started the way `make lab` starts it
(`streaming_tutorial/processes/lab.py`: a random token, a free loopback port, `--allow-root` as root), a headless
Chromium opens notebook 02 in it, runs Run > Run All Cells from the menu bar, and the tests read what the page
shows. The kernel talks to the session server: JupyterLab's environment has its TUTORIAL_SERVER_URL.

JupyterLab writes what it runs back to the file (autosave), and marks a notebook changed as soon as it opens it
(it fills in the kernel's display name and language_info), so it opens a copy in a temporary folder, with a fresh
Jupyter config and data folder: what a new user on a fresh machine gets.

`UPDATE_SCREENSHOTS=1` (as for the page's tests) saves docs/lab-notebook-02.png.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import nbformat
import psutil
import pytest
from playwright.sync_api import Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from streaming_tutorial.model import PROJECT_ROOT
from streaming_tutorial.processes.lab import NOTEBOOKS, Lab, can_open_browser, how_to_reach
from streaming_tutorial.processes.local_server import LOG_DIR, free_port

NOTEBOOK = "02-stream-with-curl.ipynb"
SCREENSHOT = PROJECT_ROOT / "docs" / "lab-notebook-02.png"
UPDATE_SCREENSHOTS = os.environ.get("UPDATE_SCREENSHOTS") == "1"
VIEWPORT = {"width": 1280, "height": 800}
KERNEL = "Python 3 (ipykernel)"  # the venv's kernelspec, as JupyterLab names it
NEWS_QUESTION = "Would you like to get notified about official Jupyter news?"  # JupyterLab asks every new user
LONGEST_OUTPUT_LINES = 60  # more than this in one output is a wall of text, not a lesson's step

# What each step of the lesson shows (a cell is found by a piece of its code): the texts its output must contain.
LESSON_OUTPUTS = [
    ("conn = connect()", ["using the server at {url} (TUTORIAL_SERVER_URL is set)", "model: "]),
    ("print(chat_body.read_text())", ['"stream": true', '"include_usage": true']),
    ("!curl -sN {URL}/v1/chat/completions", ['"role":"assistant"', '"usage":', "data: [DONE]"]),
    ("print(label(event))", ["role-only chunk", "delta", "usage chunk: ", "end of stream"]),
    ("!curl -sN {URL}/v1/completions", ['"finish_reason":"length"', "data: [DONE]"]),
    ("!curl -s {URL}/v1/chat/completions", ['"object":"chat.completion"', '"usage":']),
    ("arrival_times(*flags)", ["curl -s -N  ", "frames; first at", "distinct arrival moments"]),
]

# Every dialog and notification JupyterLab shows, recorded as it appears (a dialog may come and go).
WATCH_POPUPS = """
window.__dialogs = []; window.__toasts = [];
new MutationObserver(() => {
    for (const [selector, seen] of [['.jp-Dialog', window.__dialogs], ['.Toastify__toast', window.__toasts]])
        for (const node of document.querySelectorAll(selector))
            if (!node.__recorded) { node.__recorded = true; seen.push(node.textContent.trim().slice(0, 500)); }
}).observe(document, {childList: true, subtree: true, characterData: true});
"""
# The status bar's "Python 3 (ipykernel) | Idle": the kernel has started and answers. A learner who clicks Run All
# Cells before it (while it says "No Kernel | Initializing") gets JupyterLab's kernel-selection dialog, and nothing
# runs; the toolbar's execution indicator says idle earlier still, so it is no sign.
KERNEL_STATUS = """() => [...document.querySelectorAll('.jp-StatusBar-TextItem')].map(item => item.textContent.trim())
    .find(text => text.endsWith(' | Idle'))"""
# Run All Cells is over: the kernel is idle again, the first cell has its number and none waits ([*]: Run All
# marks them all at once). A cell that raises stops the run; the cells after it keep "[ ]:", and the tests say so.
RUN_OVER = f"""() => {{
    const prompts = [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')]
        .map(p => p.textContent.trim());
    return ({KERNEL_STATUS})() && /^\\[\\d+\\]:$/.test(prompts[0] ?? '') && !prompts.includes('[*]:');
}}"""
CELLS_AS_SHOWN = """() => [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell')].map(cell => ({
    prompt: cell.querySelector('.jp-InputPrompt').textContent.trim(),
    outputs: [...cell.querySelectorAll('.jp-OutputArea-output')].map(output => ({
        mime: output.dataset.mimeType ?? '', text: output.textContent, height: output.offsetHeight})),
}))"""


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lab(server, tmp_path_factory):
    """JupyterLab as `make lab` starts it, on a copy of notebook 02, its kernels pointed at the session server."""
    folder = tmp_path_factory.mktemp("lab-notebooks")
    shutil.copy(NOTEBOOKS / NOTEBOOK, folder)
    jupyter = tmp_path_factory.mktemp("lab-jupyter")  # a new user's: no settings, no saved workspace
    env = {"TUTORIAL_SERVER_URL": server.url, "TUTORIAL_API_KEY": "", "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
           "JUPYTER_DATA_DIR": str(jupyter / "data"), "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime")}
    with Lab(folder, env=env, log_path=LOG_DIR / "lab-test.log") as running:
        yield running


@pytest.fixture(scope="module")
def ran(lab, browser):
    """Notebook 02 opened in JupyterLab and run with Run > Run All Cells; what the page shows after it."""
    before = digest(NOTEBOOKS / NOTEBOOK), (NOTEBOOKS / ".ipynb_checkpoints").exists()
    tab = browser.new_context(viewport=VIEWPORT).new_page()
    tab.add_init_script(WATCH_POPUPS)
    started = time.monotonic()
    tab.goto(lab.url_for("lab", "tree", NOTEBOOK))
    kernel_status = wait_in_page(tab, KERNEL_STATUS, 180, "the kernel to start and say Idle")
    opened = time.monotonic() - started
    kernels = [process.cmdline() for process in lab.kernels()]
    tab.click(".lm-MenuBar-itemLabel:text-is('Run')")
    tab.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    wait_in_page(tab, RUN_OVER, 300, "Run All Cells to end")
    cells = tab.evaluate(CELLS_AS_SHOWN)
    seen = {"opened_s": round(opened, 1), "ran_s": round(time.monotonic() - started - opened, 1),
            "kernel_status": kernel_status, "kernels": kernels, "cells": cells, "sources": code_sources(lab),
            "toolbar_kernel": tab.text_content(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName").strip(),
            "dialogs": tab.evaluate("window.__dialogs"), "toasts": tab.evaluate("window.__toasts")}
    print(f"\nJupyterLab: notebook open and kernel idle after {seen['opened_s']} s, Run All Cells took "
          f"{seen['ran_s']} s; dialogs {seen['dialogs']}, notifications {seen['toasts']}")
    if UPDATE_SCREENSHOTS:
        save_screenshot(tab)
    tab.context.close()
    return {**seen, "digest_before": before[0], "checkpoints_before": before[1]}


def wait_in_page(tab: Page, condition: str, timeout: float, what: str):
    """Poll `condition` (a JavaScript function) in the page until it is truthy; return its value. On timeout,
    fail with what the page shows: the status bar, the cells' prompts and any dialog."""
    try:
        return tab.wait_for_function(condition, timeout=timeout * 1000, polling=250).json_value()
    except PlaywrightTimeout:
        shown = tab.evaluate("""() => ({
            status: [...document.querySelectorAll('.jp-StatusBar-TextItem')].map(item => item.textContent.trim()),
            prompts: [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim()),
            dialogs: window.__dialogs})""")
        pytest.fail(f"waited {timeout:.0f} s for {what}; the page shows {shown}")


# Scroll the notebook until `cell`'s bottom is the view's bottom, frame by frame: the cells brought into view
# take their real height only once painted, which moves the cell again.
SCROLL_TO_END = """cell => new Promise(done => {
    const view = cell.closest('.jp-WindowedPanel-outer');
    const step = tries => requestAnimationFrame(() => {
        const off = cell.getBoundingClientRect().bottom - view.getBoundingClientRect().bottom;
        if (Math.abs(off) < 1 || !tries) return done(off);
        view.scrollTop += off;
        step(tries - 1);
    });
    step(20);
})"""


def save_screenshot(tab: Page) -> None:
    """The end of the first curl's raw stream (the last deltas, finish_reason, the usage chunk, [DONE]), below the
    toolbar with the kernel's name, above the status bar's Idle."""
    if tab.locator(".Toastify__toast").count():  # close the news question, as a learner would
        tab.click(".Toastify__toast .jp-Notification-Toast-Close")
        tab.locator(".Toastify__toast").wait_for(state="detached")
    cell = tab.locator(".jp-NotebookPanel .jp-CodeCell").nth(2)
    cell.evaluate(SCROLL_TO_END)
    tab.screenshot(path=SCREENSHOT)


def code_sources(lab: Lab) -> list[str]:
    notebook = nbformat.read(lab.root_dir / NOTEBOOK, as_version=4)
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_jupyterlab_opens_notebook_02_on_the_venvs_kernel_without_a_dialog(ran):
    assert ran["dialogs"] == []
    assert ran["kernel_status"] == f"{KERNEL} | Idle" and ran["toolbar_kernel"] == KERNEL
    # The kernel runs in the project's venv, as JupyterLab does: the venv's python, whose ipykernel it is.
    assert [command[:3] for command in ran["kernels"]] == [[sys.executable, "-m", "ipykernel_launcher"]]
    # The only notification is JupyterLab's question to every new user; no kernel or file error.
    assert all(toast.startswith(NEWS_QUESTION) for toast in ran["toasts"]), ran["toasts"]


def test_run_all_cells_runs_every_code_cell_in_order_without_an_error(ran):
    prompts = [cell["prompt"] for cell in ran["cells"]]
    assert len(prompts) == len(ran["sources"])
    assert prompts == [f"[{i}]:" for i in range(1, len(prompts) + 1)], prompts
    stderr = [(i, output["text"]) for i, cell in enumerate(ran["cells"]) for output in cell["outputs"]
              if output["mime"] == "application/vnd.jupyter.stderr"]
    assert stderr == [], stderr  # no traceback, and not even a warning


def test_every_step_of_the_lesson_shows_its_output_and_none_is_a_wall_of_text(ran, server):
    sources, cells = ran["sources"], ran["cells"]
    for snippet, texts in LESSON_OUTPUTS:
        [index] = [i for i, source in enumerate(sources) if snippet in source]
        shown = "".join(output["text"] for output in cells[index]["outputs"])
        for text in texts:
            assert text.format(url=server.url) in shown, (snippet, text, shown[:2000])
    # The last cell stops only a server the notebook started: the session server is left running, silently.
    assert "conn.close()" in sources[-1] and cells[-1]["outputs"] == []
    for i, cell in enumerate(cells):
        for output in cell["outputs"]:
            assert output["mime"].startswith("application/vnd.jupyter.std") and output["height"] > 0, (i, output)
            assert output["text"].count("\n") <= LONGEST_OUTPUT_LINES, (i, output["text"][:2000])


def test_stopping_jupyterlab_stops_its_kernel_and_leaves_the_notebook_untouched(lab, ran):
    kernels = lab.kernels()
    assert kernels
    lab.stop()
    assert not [kernel for kernel in kernels if kernel.is_running() and kernel.status() != psutil.STATUS_ZOMBIE]
    assert digest(NOTEBOOKS / NOTEBOOK) == ran["digest_before"]
    # Nothing was written beside the notebooks either (JupyterLab keeps checkpoints next to what it saves).
    assert not (NOTEBOOKS / ".ipynb_checkpoints").exists() or ran["checkpoints_before"]


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["ctrl-c", "kill", "closed-terminal"])
def test_make_lab_works_as_root_and_says_how_to_reach_it_then_stops_on_ctrl_c(tmp_path, stop_signal):
    """`make lab`'s own command, in a root shell on this machine too: it prints an address with the token that
    JupyterLab answers on, and Ctrl-C stops JupyterLab; so do a `kill` (SIGTERM) and a closed terminal (SIGHUP)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
    wrapper = subprocess.Popen([sys.executable, "-m", "streaming_tutorial.processes.lab", "--port", str(port),
                                "--log", str(tmp_path / "lab.log")],
                               cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        lines = []
        for line in wrapper.stdout:
            lines.append(line)
            if line.startswith("Stop it with Ctrl-C"):
                break
        said = "".join(lines)
        url = re.search(r"^JupyterLab: (\S+)$", said, re.MULTILINE)
        assert url, said
        assert url.group(1).startswith(f"http://127.0.0.1:{port}/lab?token="), said
        assert f"ssh -N -L {port}:127.0.0.1:{port} " in said and 'ARGS="--ip 0.0.0.0"' in said, said
        token = url.group(1).split("token=")[1]
        status = httpx.get(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"},
                           timeout=10)
        assert status.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=10).status_code == 403  # no token, no way in
        jupyterlab = psutil.Process(wrapper.pid).children()
        wrapper.send_signal(stop_signal)
        assert wrapper.wait(60) == 0
        assert "stopped JupyterLab" in wrapper.stdout.read()
        assert not [process for process in jupyterlab if process.is_running()
                    and process.status() != psutil.STATUS_ZOMBIE]
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()


def test_lab_gets_allow_root_only_as_root_and_no_browser_without_a_graphical_session(monkeypatch, tmp_path):
    argv = Lab(tmp_path, log_path=tmp_path / "lab.log").argv
    assert ("--allow-root" in argv) == (os.geteuid() == 0)
    assert "--no-browser" in argv  # the tests' JupyterLab never opens a browser of its own
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        monkeypatch.delenv(name, raising=False)
    assert not can_open_browser() or sys.platform == "darwin"
    monkeypatch.setenv("DISPLAY", ":0")
    assert can_open_browser()
    lines = "\n".join(how_to_reach(Lab(tmp_path, port=8899, ip="0.0.0.0", log_path=tmp_path / "lab.log"), False))
    assert "http://" in lines and ":8899/lab?token=" in lines and "anyone who can reach" in lines
