"""Self-checks of library internals, the 5.24 workaround, versions in provenance, and the lock.

The upstream break (transformers 5.24 + TransformerLens 4.3: the bridge attention never writes
the HF cache) is simulated by making ``AttentionBridge._update_kv_cache`` return its inputs
unchanged, which is exactly what the unpatched method does when it finds no cache keyword.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.forward import selfcheck
from workbench.models import compat
from workbench.provenance import LIBRARIES, library_versions, lock_mismatch, locked_versions

TINY = ["tiny-llama", "tiny-gpt2", "tiny-gemma3", "toy-induction"]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A private WORKBENCH_HOME (self-check records) and a clean in-process memo."""
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    selfcheck.clear_memo()
    yield tmp_path / "home"
    selfcheck.clear_memo()


@pytest.fixture()
def broken_cache(monkeypatch, home):
    """The 5.24 failure: the bridge's attention ignores the cache it is given."""
    from transformer_lens.model_bridge.generalized_components import attention

    monkeypatch.setattr(
        attention.AttentionBridge, "_update_kv_cache", lambda self, k, v, **kw: (k, v)
    )
    return home


@pytest.mark.parametrize("name", TINY)
def test_checks_pass_on_the_installed_versions(load, home, name):
    facts = selfcheck.require(load(name), "hooks", "kv_cache", "resume")
    assert facts["hooks"] == "ok"
    assert facts["kv_cache"].startswith("ok")
    assert facts["last_query"] == "ok"
    assert facts["suffix_resume"] == "ok"  # no fallback on the locked versions


def test_check_runs_once_per_model_and_versions(load, home, monkeypatch):
    model = load("tiny-llama")
    calls = []
    real = selfcheck.CHECKS["kv_cache"]
    monkeypatch.setitem(selfcheck.CHECKS, "kv_cache", lambda m: calls.append(1) or real(m))
    selfcheck.require(model, "kv_cache")
    selfcheck.require(model, "kv_cache")
    assert calls == [1]
    record = next((home / "selfchecks").glob("*.json"))
    entry = json.loads(record.read_text())[selfcheck.versions_key()]
    assert entry["versions"] == library_versions()
    assert entry["checks"]["kv_cache"]["ok"] is True


@pytest.mark.skipif(
    os.environ.get("WORKBENCH_CANARY") == "1", reason="the canary runs newer releases on purpose"
)
def test_venv_has_the_locked_versions():
    assert set(locked_versions()) == set(LIBRARIES)
    assert lock_mismatch() == {}


def test_kv_cache_check_fires_with_one_line_naming_versions(load, broken_cache):
    model = load("tiny-llama")
    with pytest.raises(selfcheck.SelfCheckFailed) as err:
        selfcheck.require(model, "kv_cache")
    msg = str(err.value)
    assert "\n" not in msg
    assert "decoding with the KV cache differs from a full forward" in msg
    assert f"transformers {library_versions()['transformers']}" in msg
    assert "the lock has" in msg and "make setup" in msg
    assert selfcheck.failed_for(model.fingerprint, library_versions(), ("kv_cache",))
    assert selfcheck.failed_for(model.fingerprint, library_versions(), ("resume",)) is None


def test_kv_cache_check_covers_the_batched_decoder(load, home, monkeypatch):
    """Batched-decoding breaks fail the check although single-sequence decoding is right:
    cropping that keeps the rejected draft tokens (wrong values), and stacking that keeps only
    the first sample's cache (the library raises: still one line)."""
    from workbench.forward import decode

    model = load("tiny-llama")
    real_crop = decode._crop
    monkeypatch.setattr(decode, "_crop", lambda cache, length: None)
    with pytest.raises(selfcheck.SelfCheckFailed, match="differs from a full forward"):
        selfcheck.require(model, "kv_cache")
    monkeypatch.setattr(decode, "_crop", real_crop)  # (undo() would also drop the home)
    selfcheck.clear_memo()
    monkeypatch.setattr(decode, "stack_caches", lambda caches: caches[0])
    with pytest.raises(selfcheck.SelfCheckFailed, match="batched decoder's cache") as err:
        selfcheck.require(model, "kv_cache")
    assert "\n" not in str(err.value)


def test_resume_check_records_fallbacks_and_patching_stays_exact(load, broken_cache, caplog):
    from workbench.analyses.activation_patching import ActivationPatchingParams
    from workbench.analyses.activation_patching.compute import activation_patching
    from workbench.tasks import build_task

    model = load("tiny-llama")
    facts = selfcheck.require(model, "resume")
    assert facts["suffix_resume"].startswith("fallback") and facts["last_query"].startswith(
        "fallback"
    )
    prompts = build_task("ioi", model.codec, {"n_prompts": 4})
    params = ActivationPatchingParams(component="z", positions="from_first_diff")
    with caplog.at_level(logging.WARNING):
        fast = activation_patching(model, prompts, params)
        activation_patching(model, prompts, params)
    ref = activation_patching(model, prompts, params, reference=True)
    # a z sweep patches the last layer too, so it never tries the last-query block
    assert set(fast.info["fallbacks"]) == {"suffix_resume"}
    assert fast.info["self_checks"]["last_query"].startswith("fallback")
    assert fast.info["recomputed_from_pos"] == 0
    printed = [r.getMessage() for r in caplog.records if "fallback" in r.getMessage()]
    assert sorted(m.split(" on ")[0] for m in printed) == ["last_query", "suffix_resume"]
    m = next(iter(fast.head_metrics.values()))
    r = next(iter(ref.head_metrics.values()))
    assert abs(m.mean - r.mean).max() < 1e-5  # slower, still exact


def test_retrieval_refused_before_anything_is_stored(load, broken_cache, store):
    from workbench.runner import run_analysis

    with pytest.raises(selfcheck.SelfCheckFailed, match="self-check 'kv_cache' failed"):
        run_analysis(
            "retrieval_heads", load("tiny-llama"), "needle",
            params={"mode": "fast"}, task_params={"context_lengths": [90]}, store=store,
        )  # fmt: skip
    assert store.list_runs().empty


def test_cli_exit_code_2_and_nothing_stored(broken_cache, tmp_path, capsys):
    from workbench.cli import main
    from workbench.store import ResultStore

    spec = tmp_path / "r.toml"
    spec.write_text(
        'title = "r"\n[defaults]\nmodels = ["tiny-llama"]\n[[analysis]]\n'
        'name = "retrieval_heads"\nparams = { mode = "fast" }\n'
        'tasks = [{ name = "needle", context_lengths = [90] }]\n'
    )
    assert main(["run", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: self-check 'kv_cache' failed")
    assert ResultStore().list_runs().empty


def test_stored_result_not_served_under_a_failed_version_set(load, home, store, monkeypatch):
    from workbench.runner import run_analysis

    model = load("tiny-llama")
    args = dict(task_params={"n_prompts": 4}, params={"component": "z"}, store=store)
    first = run_analysis("activation_patching", model, "ioi", **args)
    assert run_analysis("activation_patching", model, "ioi", **args).from_store
    assert first.manifest["versions"] == library_versions()
    assert first.key["libraries"] == {k: library_versions()[k] for k in LIBRARIES}
    real = selfcheck.CHECKS["resume"]

    def failing(m):
        raise selfcheck._failure(m, "resume", "simulated mismatch")

    monkeypatch.setitem(selfcheck.CHECKS, "resume", failing)
    selfcheck.clear_memo()
    with pytest.raises(selfcheck.SelfCheckFailed):  # e.g. another process found it failing
        selfcheck.require(model, "resume")
    with pytest.raises(selfcheck.SelfCheckFailed, match="simulated mismatch"):
        run_analysis("activation_patching", model, "ioi", **args)  # the hit is not served
    # analyses that do not rely on that check are still served
    run_analysis("head_detectors", model, "induction", store=store)
    assert run_analysis("head_detectors", model, "induction", store=store).from_store
    # an environment that passes again recovers: the check re-runs and replaces the record
    monkeypatch.setitem(selfcheck.CHECKS, "resume", real)
    again = run_analysis("activation_patching", model, "ioi", **args)
    assert again.run_id == first.run_id
    assert selfcheck.failed_for(model.fingerprint, library_versions(), ("resume",)) is None


def test_compat_switch_enters_the_versions_key(monkeypatch):
    on = selfcheck.versions_key()
    monkeypatch.setenv("WORKBENCH_COMPAT", "off")
    assert selfcheck.versions_key() != on


def test_library_versions_enter_the_run_key(monkeypatch):
    from workbench.runner import RunRequest

    req = RunRequest("head_detectors", "tiny-llama", "induction")
    a = req.resolve("fp").run_id
    bumped = {**library_versions(), "transformers": "99.0"}
    monkeypatch.setattr("workbench.runner.library_versions", lambda: bumped)
    assert req.resolve("fp").run_id != a


def test_compat_wrapper_passes_a_cache_given_as_cache():
    class Cache:
        def __init__(self):
            self.calls = 0

        def update(self, k, v, layer_idx):
            self.calls += 1
            return torch.cat([k, k]), torch.cat([v, v])

    class Attn:
        _layer_idx = 0

    from transformer_lens.model_bridge.generalized_components import attention

    compat.install()
    compat.install()  # idempotent: wrapped once
    method = attention.AttentionBridge._update_kv_cache
    assert getattr(method, "_workbench_cache_kwarg", False)
    assert not getattr(method.__wrapped__, "_workbench_cache_kwarg", False)
    k = torch.ones(1, 2, 3, 4)
    cache = Cache()
    out_k, _ = method(Attn(), k, k, cache=cache)
    assert cache.calls == 1 and out_k.shape[0] == 2
    out_k, _ = method(Attn(), k, k)  # no cache at all: unchanged
    assert out_k.shape[0] == 1 and cache.calls == 1
    assert compat.active() == ["cache_kwarg"]


def test_bad_selfcheck_name_is_a_key_error_not_silence(load, home):
    with pytest.raises(KeyError):
        selfcheck.require(load("tiny-llama"), "no_such_check")
    assert issubclass(selfcheck.SelfCheckFailed, WorkbenchError)


def test_a_run_prints_no_upstream_deprecation_warnings(tmp_path):
    """Through the CLI, with deprecation and future warnings shown: cached decoding (retrieval,
    which has nothing to score on a random model and says so in one line) and resumed runs
    (patching) print no warning."""
    import subprocess
    import sys

    spec = tmp_path / "w.toml"
    spec.write_text(
        'title = "w"\n[defaults]\nmodels = ["tiny-llama"]\n'
        '[[analysis]]\nname = "activation_patching"\nparams = { component = "z" }\n'
        'tasks = [{ name = "ioi", n_prompts = 4 }]\n'
        '[[analysis]]\nname = "retrieval_heads"\n'
        'tasks = [{ name = "needle", context_lengths = [90], depth_percents = [50] }]\n'
    )
    env = {
        **os.environ,
        "WORKBENCH_HOME": str(tmp_path / "home"),
        "PYTHONWARNINGS": "default::DeprecationWarning,default::FutureWarning",
    }
    out = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "run", str(spec), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: retrieval_heads"), out.stderr
    assert not [line for line in lines if "Warning" in line], out.stderr
