"""MLflow's UI, seen in a real browser: a finished search's store served by ``mlflow server`` and
read by headless Chromium (the system's, driven by Playwright for Python).

What a user must find: the experiment opens on its runs table (not on MLflow's GenAI traces
overview), listing the search's parent run and its trials under names that say what differs,
with the columns a user compares; a trial's page shows its params (criterion, ratios, p, q,
lr) and metrics (val_acc, flops, flops_kept); the comparison of two trials renders.

The store is written by ``search.tracking`` exactly as a search writes it (the tracker calls the
Tune callback makes), for a handful of trials: a real ``python -m search.launch`` takes over a
minute here, the server and the browser another. ``MLFLOW_UI_STORE=<tracking uri>`` checks the
latest search of an existing store instead (its experiment tags are brought up to date).
Screenshots go to ``$MLFLOW_UI_SCREENSHOTS`` if set, else to the test's temporary folder; look
at them. Skipped where Playwright or Chromium is missing (``setup.sh`` installs both).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from search.pareto import hypervolume, mark_pareto
from search.tracking import SearchTracker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # an optional dev dependency
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="Playwright for Python is not installed: "
                       "pip install -c constraints.txt playwright (it drives the system Chromium)"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH: apt-get install chromium "
                       "(Playwright's own browser download is never used)"),
]

EXPERIMENT = "prunesearch"
SERVER_START_S = 180  # mlflow server imports a lot: ~10 s on an idle machine, ~50 s seen under load
PAGE_S = 60  # the longest wait for any one thing on a page
BASE_FLOPS = 8e6
# Trials as search/space.py samples them (per-layer ratios as ratio_<i>), with the val_acc and
# FLOPs of their final result and how they ended.
TRIALS = (
    ({"criterion": "taylor", "schedule": "uniform", "ratio": 0.47, "p": 0.028, "q": 0.38, "lr": 0.0013},
     0.90, 3.1e6, "FINISHED"),
    ({"criterion": "l1", "schedule": "differential", "ratio_low": 0.2, "ratio_high": 0.62, "p": 0.035,
      "q": 0.12, "lr": 0.0097}, 0.82, 1.8e6, "FINISHED"),
    ({"criterion": "apoz", "schedule": "per_layer", "ratio_0": 0.3, "ratio_1": 0.7, "ratio_2": 0.55,
      "p": 0.047, "q": 0.26, "lr": 0.004}, 0.61, 1.0e6, "FINISHED"),
    ({"criterion": "fpgm", "schedule": "uniform", "ratio": 0.2, "p": 0.01, "q": 0.2, "lr": 0.02},
     0.35, 6.4e6, "KILLED"),  # stopped early by ASHA
)


@dataclass
class Search:
    uri: str
    experiment_id: str
    parent: object  # mlflow.entities.Run
    children: list  # mlflow.entities.Run, best val_acc first


def _write_search(uri: str) -> None:
    """One finished search, written through SearchTracker the way search/_session.py and the
    Tune callback write it."""
    tracker = SearchTracker(uri, EXPERIMENT)
    tracker.start_search("ui-check", {"model": {"name": "small_cnn"}, "search": {"num_trials": len(TRIALS)}})
    rows = []
    for i, (config, val_acc, flops, status) in enumerate(TRIALS):
        trial_id = f"5f728_{i:05d}"
        tracker.trial_run(trial_id, config, {"trial_name": f"trial_fn_{trial_id}"})
        for step in range(0, 40, 10):  # the recovery curve
            tracker.log_result(trial_id, {"step": step, "epoch": step / 20, "val_acc": val_acc * (0.7 + step / 130),
                                          "flops": flops, "phase": "recovery"})  # keys in the protocol's order
        final = {"step": 40, "val_acc": val_acc, "flops": flops, "params": flops / 100, "latency_ms": 1.2,
                 "flops_before": BASE_FLOPS, "wall_s": 9.0, "trial_done": True}
        if status == "FINISHED":
            tracker.log_result(trial_id, final)
        tracker.end_trial(trial_id, status, final=final if status == "FINISHED" else None)
        rows.append({"trial_id": trial_id, "status": "COMPLETED" if status == "FINISHED" else "STOPPED_EARLY",
                     "val_acc": val_acc, "flops": flops, "flops_kept": flops / BASE_FLOPS})
    rows = mark_pareto(rows)
    for row in rows:
        tracker.set_pareto(row["trial_id"], row["pareto"])
    hv = hypervolume([(r["val_acc"], r["flops_kept"]) for r in rows if r["pareto"]], (0.0, 1.0))
    tracker.finish_search({"hypervolume": hv, "n_completed": sum(r["status"] == "COMPLETED" for r in rows),
                           "n_trials": len(rows)}, [])


def _latest_search(uri: str) -> Search:
    tracker = SearchTracker(uri, EXPERIMENT)  # declares the experiment if an older version did not
    client = tracker.client
    [parent] = client.search_runs([tracker.experiment_id], "tags.role = 'search'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    children = client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    children.sort(key=lambda r: -r.data.metrics.get("val_acc", -1.0))
    return Search(uri, tracker.experiment_id, parent, children)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """The tracking URI: ``$MLFLOW_UI_STORE``, else a new SQLite store with MLflow's tables made
    (so that the server, started next, finds them and only reads)."""
    uri = os.environ.get("MLFLOW_UI_STORE")
    if not uri:
        uri = f"sqlite:///{tmp_path_factory.mktemp('ui_store') / 'mlflow.db'}"
        SearchTracker(uri, EXPERIMENT)
    return uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def wait_ready(self) -> str:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return self.url
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up after {SERVER_START_S} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def mlflow_server(store, tmp_path_factory):
    """``mlflow server`` on the store, on a free loopback port, starting while the search is
    written; its own process group, ended (TERM, then KILL) by that group's id at the end."""
    port, log = _free_port(), tmp_path_factory.mktemp("ui_server") / "mlflow_server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner: nothing here uses it
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield Server(proc, f"http://127.0.0.1:{port}", log)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=15)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def search(store, mlflow_server) -> Search:
    if not os.environ.get("MLFLOW_UI_STORE"):
        _write_search(store)
    return _latest_search(store)


@pytest.fixture(scope="module")
def server(search, mlflow_server) -> str:
    return mlflow_server.wait_ready()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=PAGE_S * 1000)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    """A page in a fresh profile, as a first-time user opens it: nothing remembered, so the UI's
    defaults (GenAI first) apply. MLflow's assistant panel is kept closed so that it hides no
    part of the screenshots."""
    context = browser.new_context(viewport={"width": 1500, "height": 900})
    context.add_init_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
    context.set_default_timeout(PAGE_S * 1000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MLFLOW_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui_screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _cell(page, text: str):
    """The first element whose whole text is ``text`` (a table cell, a link, a label)."""
    return page.get_by_text(text, exact=True).first


def _open_runs_table(page, search: Search, server: str) -> None:
    """The experiment's runs table through the link a search prints (``SearchTracker.ui_url``),
    waited for until every run of the search is listed."""
    page.goto(SearchTracker(search.uri, EXPERIMENT).ui_url(server))
    for run in (search.parent, *search.children):
        _cell(page, run.info.run_name).wait_for()


def test_experiment_opens_on_the_runs_table_with_useful_columns(search, server, page, shots):
    page.set_viewport_size({"width": 2800, "height": 600})  # the grid renders only the columns in view
    _open_runs_table(page, search, server)  # the parent and its trials, named by what differs
    page.wait_for_timeout(1000)  # let the grid settle before the screenshot
    page.screenshot(path=shots / "mlflow_runs_table.png")
    assert "/runs" in page.url and "/overview" not in page.url
    body = page.inner_text("body")
    assert "Detect Issues" not in body and "Token Usage" not in body  # not the GenAI overview
    headers = [h.strip() for h in page.locator("[role=columnheader]").all_inner_texts()]
    for column in ("val_acc", "flops_kept", "criterion", "prune.schedule", "prune.p", "prune.q", "finetune.lr", "pareto",
                   "hypervolume", "best_val_acc", "best_val_acc_flops_kept_le_0.5", "best_val_acc_flops_kept_le_0.25"):
        assert column in headers, (column, headers)
    # Sorted by val_acc, best first: the order of the trial names down the page.
    tops = [_cell(page, c.info.run_name).bounding_box()["y"] for c in search.children if "val_acc" in c.data.metrics]
    assert tops == sorted(tops) and len(tops) >= 2


def test_trial_page_shows_params_and_metrics(search, server, page, shots):
    """The path a user takes (README): the table, "Override saved view" (the columns become this
    browser's own view), a trial, and "Model training" once where MLflow 3.17 shows the GenAI
    sidebar on a run page (it remembers the switch per browser, not per experiment)."""
    child = search.children[0]  # the best trial
    _open_runs_table(page, search, server)
    page.get_by_role("button", name="Override saved view").click()
    _cell(page, child.info.run_name).click()
    page.wait_for_url(f"**/runs/{child.info.run_id}**")
    page.get_by_text("Model training", exact=True).click()  # back to the table, now in this browser's view
    _cell(page, "flops_kept").wait_for()  # the saved columns without the link's view key
    assert "viewStateShareKey" not in page.url
    _cell(page, child.info.run_name).click()
    page.wait_for_url(f"**/runs/{child.info.run_id}**")
    for key in ("val_acc", "flops", "flops_kept"):
        _cell(page, key).wait_for()
    page.wait_for_timeout(500)
    page.screenshot(path=shots / "mlflow_trial_page.png")
    body = page.inner_text("body")
    assert "Sessions" not in body and "Evaluation runs" not in body  # the training sidebar, not GenAI's
    params = child.data.params
    shown = [k for k in params if k in ("criterion", "prune.schedule", "prune.p", "prune.q", "finetune.lr")
             or k.startswith("prune.ratio")]
    assert {"criterion", "prune.p", "prune.q", "finetune.lr"} <= set(shown) and any(k.startswith("prune.ratio") for k in shown)
    for key in shown:
        assert key in body and params[key] in body, (key, params[key])
    metrics = child.data.metrics
    assert metrics["flops_kept"] == pytest.approx(metrics["flops"] / metrics["flops_before"])
    for key in ("val_acc", "flops", "flops_kept"):
        assert key in body
    assert f"{metrics['flops']:.0f}" in body.replace(",", "")


def test_comparison_of_two_trials_renders(search, server, page, shots):
    first, second = search.children[:2]  # the two best: the first two rows
    _open_runs_table(page, search, server)
    boxes = page.get_by_role("checkbox")  # the header's select-all, then one per row, in row order
    boxes.nth(1).check()
    boxes.nth(2).check()
    page.get_by_role("button", name="Compare").click()
    page.get_by_text("Comparing 2 Runs").first.wait_for()
    page.get_by_text("Parallel Coordinates Plot").first.wait_for()
    page.locator("svg").first.wait_for()  # the plot
    page.wait_for_timeout(1000)
    # The plot's default metric is the one a trial logged first: the tracker logs val_acc first.
    chosen = page.get_by_text("Metrics:", exact=True).locator("xpath=following-sibling::*[1]").inner_text()
    assert chosen.split() == ["val_acc"], chosen
    page.screenshot(path=shots / "mlflow_compare.png", full_page=True)
    body = page.inner_text("body")
    for child in (first, second):
        assert child.info.run_name in body and child.info.run_id in body
    for key in ("criterion", "finetune.lr", "val_acc", "flops_kept"):
        assert key in body
    assert first.data.params["criterion"] in body and second.data.params["criterion"] in body
