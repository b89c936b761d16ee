"""Specs on a real local Ray cluster (a head and a second node, loopback only, started and
stopped by the test): results equal the in-process run's row for row, both nodes work, the
driver alone writes the store, failures are reported, bad addresses are one-line errors."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.tables import assert_same_rows
from workbench.cli import main
from workbench.store import ResultStore

pytest.importorskip("ray")

SPEC = """
title = "ray"
[defaults]
models = ["tiny-llama"]
[[analysis]]
name = "head_detectors"
tasks = [
    { name = "induction", seq_len = 8, n_prompts = 4 },
    { name = "induction", seq_len = 9, n_prompts = 4 },
]
[[analysis]]
name = "activation_patching"
params = { component = "resid_pre" }
tasks = [{ name = "ioi", n_prompts = 4 }]
[[analysis]]
name = "direct_logit_attribution"
tasks = [{ name = "ioi", n_prompts = 4 }]
"""


@pytest.fixture(scope="module")
def cluster():
    from workbench.jobs.cluster import start_local_cluster

    c = start_local_cluster(nodes=2, cpus_per_node=1)
    yield c
    c.stop()
    assert not c.pids(), "the test's Ray processes are gone"


def _tables(store: ResultStore) -> dict[str, dict]:
    out = {}
    for run_id in store.list_runs()["run_id"]:
        r = store.load(run_id)
        out[run_id] = {name: t for name, t in r.tables.items()}
    return out


def test_ray_results_equal_the_local_run_row_for_row(cluster, tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "local"))
    assert main(["run", str(spec), "--no-progress"]) == 0
    local = _tables(ResultStore())
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "ray"))
    assert main(["run", str(spec), "--no-progress", "--ray", cluster.address]) == 0
    assert "4 part(s): 4 computed, 0 from the store" in capsys.readouterr().out
    store = ResultStore()
    remote = _tables(store)
    assert sorted(remote) == sorted(local)
    for run_id, tables in local.items():
        assert sorted(remote[run_id]) == sorted(tables)
        for name, table in tables.items():
            assert_same_rows(remote[run_id][name], table)
    nodes = {store.load(r).info["ray_node"] for r in remote}
    assert len(nodes) == 2, "both nodes computed parts"
    assert main(["run", str(spec), "--no-progress", "--ray", cluster.address]) == 0
    assert "0 computed, 4 from the store" in capsys.readouterr().out


def test_a_failing_part_is_reported_and_the_others_stored(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    spec = tmp_path / "spec.toml"
    spec.write_text(
        textwrap.dedent("""
        [defaults]
        models = ["tiny-llama"]
        [[analysis]]
        name = "head_detectors"
        tasks = [{ name = "induction", seq_len = 8, n_prompts = 4 }]
        [[analysis]]
        name = "activation_patching"
        params = { layers = [99] }
        tasks = [{ name = "ioi", n_prompts = 4 }]
    """)
    )
    assert main(["run", str(spec), "--no-progress", "--ray", cluster.address]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 part(s) failed on Ray" in err and "\n" not in err.strip()
    runs = ResultStore().list_runs()
    assert list(runs["analysis"]) == ["head_detectors"]  # the good part is stored, once
    assert json.loads(runs["params"][0])["batch_size"] == 8


def test_bad_ray_addresses_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    for address in ("127.0.0.1:1", "nonsense"):
        assert main(["run", str(spec), "--no-progress", "--ray", address]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["run", str(spec), "--ray", "auto", "--workers", "2"]) == 2
    assert ResultStore().list_runs().empty


def test_a_part_whose_actor_dies_is_retried_on_a_fresh_actor(cluster, tmp_path):
    """kill -9 of the actor computing a part: the part is retried once and stored once."""
    import signal
    import threading
    import time

    import psutil

    from workbench.jobs.ray_pool import run_on_ray
    from workbench.runner import RunRequest

    part = RunRequest(
        "head_detectors", "tiny-llama", "induction", {"batch_size": 1},
        {"seq_len": 48, "n_prompts": 3000},
    ).resolve()  # fmt: skip
    store = ResultStore(tmp_path / "store")
    out: list = []
    errors: list = []

    def drive() -> None:
        try:
            out.extend(run_on_ray([part], store, cluster.address, progress=False))
        except BaseException as e:
            errors.append(e)

    def actors() -> set[int]:
        found = set()
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any("PartWorker" in c for c in (p.info["cmdline"] or [])):
                found.add(p.info["pid"])
        return found

    earlier = actors()  # actors of earlier tests may still be exiting: never the victim
    thread = threading.Thread(target=drive)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        for pid in actors() - earlier:
            try:
                victim = psutil.Process(pid)
                if sum(victim.cpu_times()[:2]) < 1.0:
                    continue  # not yet loading the model and computing
                victim.send_signal(signal.SIGKILL)
                killed = pid
                break
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    assert killed is not None, "no new PartWorker seen computing (or the part ended first)"
    thread.join(timeout=300)
    assert not errors, errors
    assert [o.status for o in out] == ["computed"]
    runs = store.list_runs()
    assert list(runs["run_id"]) == [part.run_id]


def test_the_driver_finishes_each_computed_part_through_finish_part(cluster, tmp_path, monkeypatch):
    """The actor computes; the driver stores the part and runs its after-store hook through the
    runner's one ``finish_part``, once, after the one serve decision said compute; run again,
    the stored part is served by that decision and nothing reaches the cluster."""
    from tests.test_runner import count_finishes
    from workbench.jobs.ray_pool import run_on_ray
    from workbench.runner import RunRequest

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    calls = count_finishes(monkeypatch)
    request = RunRequest("head_detectors", "tiny-llama", "induction", {}, {"seq_len": 8})
    part = request.resolve()
    store = ResultStore(tmp_path / "store")
    out = run_on_ray([part], store, cluster.address, progress=False)
    assert [o.status for o in out] == ["computed"] and store.has(part.run_id)
    assert calls == {
        "serve": [(part.run_id, None)],
        "finish": [(part.run_id, "computed")],
        "hook": [part.run_id],
    }
    for kind in calls.values():
        kind.clear()
    out = run_on_ray([part], store, "127.0.0.1:1", progress=False)  # never connects
    assert [o.status for o in out] == ["stored"]
    assert calls == {"serve": [(part.run_id, "stored")], "finish": [], "hook": []}
