"""The web app in a real browser: headless Debian Chromium driven by Playwright's Python package.

The test starts the app (``streamlit run``) on a free local port with a store holding results,
opens the atlas, chooses a head, sees its attention map, runs a small patching job to
completion, downloads a CSV and checks its rows. Screenshots go to ``tests/artifacts/``.
Without Chromium or Playwright the tier is skipped with the reason, except under ``CI=true``,
where it fails. The default variant uses tiny-llama; the ``models`` variant SmolLM2, and prints
the atlas page's render time in the browser.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.tables import assert_same_rows

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"


def _unavailable() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (install it with `apt-get install -y chromium` as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing (make setup installs it)"
    if shutil.which("streamlit", path=str(Path(sys.executable).parent)) is None:
        return "streamlit is missing (make setup installs it)"
    return None


@pytest.fixture(scope="module")
def browser():
    why = _unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tier cannot run under CI: {why}")
        print(f"skipping the browser tier: {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--headless"]
        )
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(home: Path, model: str, workers: int = 0) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "WORKBENCH_HOME": str(home), "WORKBENCH_APP_MODEL": model,
           "WORKBENCH_APP_WORKERS": str(workers)}  # fmt: skip
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "streamlit"),
            "run",
            str(ROOT / "app" / "Home.py"),
            "--server.address=127.0.0.1",
            f"--server.port={port}",
            "--server.headless=true",
            "--browser.gatherUsageStats=false",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(
        f"the app did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
    )


def _fill_store(home: Path, model: str, n_prompts: int) -> None:
    from workbench.runner import run_analysis
    from workbench.store import ResultStore

    store = ResultStore(home / "store")
    run_analysis(
        "head_detectors",
        model,
        "induction",
        task_params={"seq_len": 12, "n_prompts": n_prompts},
        store=store,
    )
    run_analysis(
        "direct_logit_attribution", model, "ioi", task_params={"n_prompts": n_prompts}, store=store
    )


def _journey(browser, home: Path, model: str, tag: str, patch_layers: str) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)  # model loads and runs happen in the app
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    proc, url = _serve(home, model)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(90_000)
        # 1. atlas; render time: navigation until the heatmap is drawn, on a fresh server
        # (cold: the first page also loads the app's scripts) and again (warm)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            page.goto(f"{url}/Atlas")
            page.locator(".js-plotly-plot .heatmaplayer").first.wait_for()
            times.append(time.perf_counter() - t0)
        server = page.get_by_text("atlas page built in").inner_text()
        print(
            f"[{tag}] atlas page rendered in the browser in {times[0]:.2f} s "
            f"(fresh server), {times[1]:.2f} s (reload); {server}"
        )
        page.screenshot(path=str(ARTIFACTS / f"{tag}-1-atlas.png"), full_page=True)
        # 2. choose a head (the top head of the score) and see its attention map
        page.get_by_role("button", name="Open head page").click()
        expect(page.get_by_text("Attention map", exact=True)).to_be_visible()
        page.locator(".js-plotly-plot .heatmaplayer").first.wait_for()
        expect(page.get_by_text("Tokens it attends to most")).to_be_visible()
        assert "layer=" in page.url and "head=" in page.url
        page.get_by_text("Tokens it attends to most").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / f"{tag}-2-head.png"))
        # 3. run a small patching job to completion
        page.goto(f"{url}/Run")
        page.get_by_role("combobox", name="Analysis").click()
        page.get_by_role("option", name="activation_patching", exact=True).click()
        expect(page.get_by_text("exact activation patching")).to_be_visible()
        n_prompts = page.get_by_role("spinbutton", name="n_prompts")
        expect(n_prompts).to_have_count(1)  # the previous analysis's widgets are gone
        expect(n_prompts).to_have_value("16")
        n_prompts.fill("2")
        n_prompts.press("Enter")
        expect(page.get_by_role("spinbutton", name="n_prompts")).to_have_value("2")
        layers = page.get_by_role("textbox", name="layers")
        layers.fill(patch_layers)
        layers.press("Enter")
        expect(page.get_by_role("textbox", name="layers")).to_have_value(patch_layers)
        page.get_by_role("button", name="Run", exact=True).click()
        expect(page.get_by_text("is in the store")).to_be_visible()
        page.locator(".js-plotly-plot .heatmaplayer").first.wait_for()
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / f"{tag}-3-run.png"))
        # 4. download the newest run's table as CSV and check its rows against the store
        page.goto(f"{url}/Runs")
        with page.expect_download() as info:
            page.get_by_role("button", name="Download CSV").click()
        download = info.value
        target = ARTIFACTS / f"{tag}-{download.suggested_filename}"
        download.save_as(str(target))
        page.screenshot(path=str(ARTIFACTS / f"{tag}-4-runs.png"), full_page=True)
        run_id, table = download.suggested_filename.removesuffix(".csv").split("-", 1)
        from workbench.store import ResultStore

        stored = ResultStore(home / "store").get(run_id)
        assert stored is not None and stored.key["analysis"] == "activation_patching"
        got = pd.read_csv(target)
        want = stored.tables[table]
        assert len(got) == len(want) > 0
        assert list(got.columns) == list(want.columns)
        assert sorted(set(got["layer"])) == sorted(
            int(x) for x in patch_layers.strip("[]").split(",")
        )
        page.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _start_patching(page, url: str, n_prompts: int) -> None:
    from playwright.sync_api import expect

    page.goto(f"{url}/Run")
    page.get_by_role("combobox", name="Analysis").click()
    page.get_by_role("option", name="activation_patching", exact=True).click()
    expect(page.get_by_text("exact activation patching")).to_be_visible()
    box = page.get_by_role("spinbutton", name="n_prompts")
    box.fill(str(n_prompts))
    box.press("Enter")
    expect(page.get_by_role("spinbutton", name="n_prompts")).to_have_value(str(n_prompts))


def test_two_sessions_run_patching_at_once_on_the_job_pool(browser, tmp_path):
    """Two browser sessions start a patching run at the same moment on an app with a worker
    pool: both finish, both equal the sequential results, and a reload keeps each page's run."""
    from playwright.sync_api import expect

    from workbench.runner import run_analysis
    from workbench.store import ResultStore

    expect.set_options(timeout=120_000)
    home = tmp_path / "home"
    home.mkdir()
    _fill_store(home, "tiny-llama", n_prompts=2)  # not an empty store: no starter runs
    proc, url = _serve(home, "tiny-llama", workers=2)
    try:
        pages = [browser.new_context().new_page() for _ in range(2)]
        for page, n in zip(pages, (3, 4), strict=True):
            page.set_default_timeout(120_000)
            _start_patching(page, url, n)
        for page in pages:  # as close to the same moment as two users get
            page.get_by_role("button", name="Run", exact=True).click()
        for page in pages:
            expect(page.get_by_text("is in the store")).to_be_visible()
            assert "run=" in page.url
            page.reload()
            expect(page.get_by_text("is in the store")).to_be_visible()
        page.locator(".js-plotly-plot .heatmaplayer").first.wait_for()
        page.get_by_text("is in the store").scroll_into_view_if_needed()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "jobs-two-sessions.png"))
        store = ResultStore(home / "store")
        for page, n in zip(pages, (3, 4), strict=True):
            run_id = page.url.split("run=")[1].split("&")[0]
            got = store.load(run_id)
            want = run_analysis("activation_patching", "tiny-llama", "ioi",
                                task_params={"n_prompts": n},
                                store=ResultStore(tmp_path / f"sequential{n}"))  # fmt: skip
            assert got.run_id == want.run_id
            assert_same_rows(got.heads["value"], want.heads["value"])
        from workbench.jobs.queue import JobQueue

        jobs = JobQueue(home / "store").jobs()
        assert len(jobs) == 2 and {j.state for j in jobs} == {"done"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_browser_journey_tiny(browser, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    _fill_store(home, "tiny-llama", n_prompts=2)
    _journey(browser, home, "tiny-llama", "tiny", "[0, 1]")


@pytest.mark.models
def test_browser_journey_smollm2(browser, tmp_path):
    """SmolLM2 results in the store; the converted weights are shared through WORKBENCH_HOME."""
    from workbench.home import workbench_home

    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(workbench_home() / "models", target_is_directory=True)
    old = os.environ.get("WORKBENCH_HOME")
    os.environ["WORKBENCH_HOME"] = str(home)
    try:
        _fill_store(home, "smollm2-135m", n_prompts=4)
    finally:
        if old is None:
            os.environ.pop("WORKBENCH_HOME")
        else:
            os.environ["WORKBENCH_HOME"] = old
    _journey(browser, home, "smollm2-135m", "smollm2", "[0, 1]")
