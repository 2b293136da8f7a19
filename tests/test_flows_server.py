"""Orchestration as a team uses it: a real Prefect server, the deployment process of
`make deploy`, and a pipeline run triggered through the API exactly as the UI's Run button does
(create a flow run from the deployment). A second run finds every stage current and skips it."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_pipeline_e2e import _tiny_config  # tests/ is on sys.path (rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("clean", "tokenize", "train", "evaluate", "export")

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    """A Prefect server on a free 127.0.0.1 port plus `python -m flows.deploy` serving to it."""
    tmp = tmp_path_factory.mktemp("prefect_stack")
    config = _tiny_config(tmp)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PRETRAIN_PIPELINE_STATE": str(tmp / "state"),
        "PREFECT_HOME": str(tmp / "state" / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api,  # the UI's JavaScript calls this (default: port 4200)
        "PRETRAIN_PIPELINE_QUIET": "1",
        "WANDB_MODE": "offline",
    }
    env.pop("PREFECT_API_URL", None)
    (tmp / "state" / "prefect").mkdir(parents=True)  # the server's SQLite database lives here
    server_log = open(tmp / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp, env=env, stdout=server_log, stderr=subprocess.STDOUT,
    )
    procs = [server]
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp / "server.log").read_text()[-4000:]
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Prefect server did not become healthy"
            time.sleep(1)
        serve_log = open(tmp / "serve.log", "w")
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.deploy", "--config", str(config)],
            cwd=ROOT, env={**env, "PREFECT_API_URL": api}, stdout=serve_log, stderr=subprocess.STDOUT,
        )
        procs.append(serve)
        yield {"api": api, "tmp": tmp, "serve": serve, "serve_log": tmp / "serve.log"}
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture(scope="module")
def client(prefect_stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_stack["api"]}):
        with get_client(sync_client=True) as c:
            yield c


def _deployment(client, name, serve, serve_log, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        assert serve.poll() is None, serve_log.read_text()[-4000:]
        try:
            return client.read_deployment_by_name(name)
        except Exception:
            assert time.monotonic() < deadline, f"deployment {name} never registered:\n{serve_log.read_text()[-4000:]}"
            time.sleep(1)


def _run_to_end(client, deployment_id, stack, parameters=None, timeout=600):
    run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters or {})
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run.id)
        if run.state is not None and run.state.is_final():
            return run
        assert stack["serve"].poll() is None, stack["serve_log"].read_text()[-4000:]
        assert time.monotonic() < deadline, f"flow run stuck in {run.state}:\n{stack['serve_log'].read_text()[-4000:]}"
        time.sleep(2)


def _task_states(client, flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {t.name.rsplit("-", 1)[0] if t.name not in STAGES else t.name: t.state.type.value for t in runs}


def _artifacts(client, flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


@pytest.fixture(scope="module")
def first_run(prefect_stack, client):
    dep = _deployment(client, "pretrain-pipeline/e2e", prefect_stack["serve"], prefect_stack["serve_log"])
    return dep, _run_to_end(client, dep.id, prefect_stack)


# Runs the UI test submitted from the deployment form (a second run: every stage current).
_FORM_RUNS: list = []


@pytest.fixture(scope="module")
def rerun(prefect_stack, client, first_run):
    """A second run of the deployment: the one the UI test submitted from the form if it ran
    (tests run in file order), else one created through the API."""
    dep, _ = first_run
    if _FORM_RUNS:
        return client.read_flow_run(_FORM_RUNS[0])
    return _run_to_end(client, dep.id, prefect_stack)


def test_first_run_completes_every_stage_with_artifacts(prefect_stack, client, first_run):
    _, first = first_run
    assert first.state.is_completed(), f"{first.state}\n{prefect_stack['serve_log'].read_text()[-4000:]}"
    states = _task_states(client, first.id)
    for stage in (*STAGES, "report"):
        assert states.get(stage) == "COMPLETED", states
    arts = _artifacts(client, first.id)
    for stage in (*STAGES, "report"):
        assert f"e2e-{stage}" in arts, sorted(arts)
    assert "| skipped | False |" in arts["e2e-clean"].data
    assert "| skipped | False |" in arts["e2e-train"].data
    run_dir = prefect_stack["tmp"] / "runs" / "e2e"
    assert (run_dir / "export" / "hf").is_dir()
    assert str(run_dir) in arts["e2e-train"].data
    # Tables and links: filter funnel, shard manifest summary, final metrics, run dir, W&B run.
    funnel = {row["step"]: row["left"] for row in json.loads(arts["e2e-filter-funnel"].data)}
    assert list(funnel)[:3] == ["input", "read", "repair"] and list(funnel)[-1] == "kept", funnel
    assert funnel["input"] == 800 and 0 < funnel["kept"] <= 800, funnel
    assert "\n- `" in arts["e2e-dropped-examples"].data, arts["e2e-dropped-examples"].data  # one example at least
    manifest = {row["split"]: row for row in json.loads(arts["e2e-shard-manifest"].data)}
    assert manifest["train"]["tokens"] > 0 and manifest["val"]["tokens"] > 0, manifest
    assert "| byte-fallback rate |" in arts["e2e-tokenizer-report"].data, sorted(arts)
    metrics = {row["metric"]: row["value"] for row in json.loads(arts["e2e-final-metrics"].data)}
    assert metrics["perplexity"] > 1 and metrics["bits_per_byte"] > 0, metrics
    # Prefect stores link artifacts as markdown "[text](url)".
    assert f"({run_dir.resolve().as_uri()})" in arts["e2e-run-dir"].data, arts["e2e-run-dir"].data
    if "| wandb_dir | None |" not in arts["e2e-train"].data:
        assert f"({run_dir.resolve().as_uri()}/" in arts["e2e-wandb"].data, arts["e2e-wandb"].data


def test_bad_parameter_is_refused_before_anything_runs(client, first_run):
    dep, _ = first_run
    from prefect.exceptions import PrefectHTTPStatusError

    bad = dict(dep.parameters)
    bad["config"] = {**bad["config"], "train": {**bad["config"]["train"], "max_steps": "many"}}
    with pytest.raises(PrefectHTTPStatusError) as err:
        client.create_flow_run_from_deployment(dep.id, parameters=bad)
    assert err.value.response.status_code in (409, 422)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_ui_runs_the_deployment_from_its_form(prefect_stack, client, first_run, tmp_path):
    """What a person does: open the UI, find the deployment, Run -> Custom run, submit the form
    (the typed config with its defaults), watch the run reach Completed, then look at its task
    runs and its artifacts: the filter funnel and the dropped examples. Everything is current
    after the first run, so this run only checks fingerprints (its artifacts are published anyway);
    test_rerun_skips_every_current_stage then checks it skipped every stage."""
    from playwright.sync_api import expect, sync_playwright

    dep, _ = first_run
    ui = prefect_stack["api"].removesuffix("/api")
    shots = Path(os.environ.get("PREFECT_UI_SCREENSHOTS", tmp_path))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"{ui}/deployments")
            page.get_by_role("link", name="e2e").first.wait_for()
            page.goto(f"{ui}/deployments/deployment/{dep.id}")
            expect(page.get_by_text("pretrain-pipeline").first).to_be_visible()
            page.get_by_role("button", name="Run", exact=True).first.click()
            page.get_by_text("Custom run").first.click()
            page.wait_for_url("**/run**")
            before = _deployment_run_ids(client, dep.id)
            page.get_by_role("button", name="Submit", exact=True).click()
            # The UI may stay on the deployment (with a toast) or open the run; either way the
            # server must now hold a new run of this deployment, created by the form.
            deadline = time.monotonic() + 60
            new: set = set()
            while not new and time.monotonic() < deadline:
                time.sleep(1)
                new = _deployment_run_ids(client, dep.id) - before
            if not new:
                page.screenshot(path=str(shots / "prefect-ui-submit-failed.png"), full_page=True)
            assert len(new) == 1, "submitting the form created no flow run"
            run_id = new.pop()
            page.goto(f"{ui}/runs/flow-run/{run_id}")
            deadline = time.monotonic() + 600
            while not client.read_flow_run(run_id).state.is_final() and time.monotonic() < deadline:
                time.sleep(2)
            page.reload()
            # The run's state badge (exact text; log lines also say "Completed()").
            expect(page.get_by_text("Completed", exact=True).first).to_be_visible(timeout=60_000)
            _ui_run_pages(page, shots)
        finally:
            browser.close()
    run = client.read_flow_run(run_id)
    assert run.deployment_id == dep.id and run.state.is_completed(), run.state
    _FORM_RUNS.append(run_id)
    for name in UI_SHOTS:
        assert (shots / name).stat().st_size > 10_000, name


UI_SHOTS = ("prefect-ui-run.png", "prefect-ui-artifacts.png", "prefect-ui-funnel.png", "prefect-ui-dropped.png")


def _ui_run_pages(page, shots: Path) -> None:
    """On the open flow run page: its Task Runs tab (every stage's task, completed), its Artifacts
    tab (keyed by run name), then the funnel table and the dropped examples; one screenshot each.
    The page scrolls inside its own pane, so each shot sets a viewport tall enough for it."""
    import re

    from playwright.sync_api import expect

    page.locator("li.p-tab", has_text="Task Runs").click()
    for stage in (*STAGES, "report"):  # task run names are "<task>-<3 hex digits>"
        expect(page.get_by_role("link", name=re.compile(rf"^{stage}-[0-9a-f]+$")).first).to_be_visible()
    page.set_viewport_size({"width": 1400, "height": 1500})
    page.screenshot(path=str(shots / UI_SHOTS[0]))
    page.locator("li.p-tab", has_text="Artifacts").click()
    for key in ("e2e-filter-funnel", "e2e-dropped-examples", "e2e-shard-manifest", "e2e-final-metrics"):
        expect(page.get_by_text(key, exact=True).last).to_be_visible()
    page.set_viewport_size({"width": 1400, "height": 2000})
    page.screenshot(path=str(shots / UI_SHOTS[1]))
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.get_by_text("e2e-filter-funnel", exact=True).last.click()
    for step in ("input", "repair", "kept"):  # rows of the funnel table
        expect(page.locator(".artifact-data-table__cell").get_by_text(step, exact=True).first).to_be_visible()
    page.screenshot(path=str(shots / UI_SHOTS[2]))
    page.go_back()
    page.locator("li.p-tab", has_text="Artifacts").click()
    page.get_by_text("e2e-dropped-examples", exact=True).last.click()
    expect(page.get_by_role("heading", name=re.compile("Dropped documents of run")).first).to_be_visible()
    page.screenshot(path=str(shots / UI_SHOTS[3]))


def test_rerun_skips_every_current_stage(client, rerun):
    assert rerun.state.is_completed(), rerun.state
    arts = _artifacts(client, rerun.id)
    for stage in STAGES:
        body = arts[f"e2e-{stage}"].data
        assert "| skipped | True |" in body and "| skipped | False |" not in body, (stage, body)


def _deployment_run_ids(client, deployment_id) -> set:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return {r.id for r in runs}


def _training_pids(run_dir: Path) -> set[int]:
    """torchrun and its ranks for this run (they live in their own session, see pretrain.launch)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "pretrain.trainer" in cmd and str(run_dir) in cmd:
            pids.add(int(proc.name))
    return pids


def test_cancelling_a_training_run_stops_the_training_job(prefect_stack, client, first_run):
    """Cancel from the API as the UI's Cancel button does; the torchrun process group must go."""
    from prefect.states import Cancelling

    dep = _deployment(client, "train/e2e", prefect_stack["serve"], prefect_stack["serve_log"])
    config = dict(dep.parameters["config"])
    config["train"] = {**config["train"], "max_steps": 100_000}  # long enough to still be running
    run = client.create_flow_run_from_deployment(dep.id, parameters={"config": config, "force": True})
    run_dir = prefect_stack["tmp"] / "runs" / "e2e"
    deadline = time.monotonic() + 240
    while not _training_pids(run_dir):
        assert not client.read_flow_run(run.id).state.is_final(), client.read_flow_run(run.id).state
        assert time.monotonic() < deadline, prefect_stack["serve_log"].read_text()[-4000:]
        time.sleep(1)
    time.sleep(5)  # let the ranks get into their training loop
    client.set_flow_run_state(run.id, Cancelling(), force=True)
    deadline = time.monotonic() + 120
    while _training_pids(run_dir) or not client.read_flow_run(run.id).state.is_final():
        assert time.monotonic() < deadline, (
            f"training still running after cancel: {_training_pids(run_dir)} "
            f"state {client.read_flow_run(run.id).state}"
        )
        time.sleep(1)
    assert client.read_flow_run(run.id).state.is_cancelled(), client.read_flow_run(run.id).state
