"""Devices and precision: bad input is a one-line error before anything is loaded or queued;
float32 keys are unchanged; bfloat16 enters the key, and its fast paths hold their stated bound
(``models.precision.TOLERANCE``) against the bf16 reference and against float32."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from workbench.analyses.activation_patching import ActivationPatchingParams
from workbench.analyses.activation_patching.compute import activation_patching
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.models.precision import TOLERANCE, check_device, check_dtype
from workbench.runner import RunRequest, run_analysis
from workbench.tasks import build_task

IND = {"seq_len": 10, "n_prompts": 4}


@pytest.mark.parametrize(
    ("device", "dtype", "match"),
    [
        ("tpu", None, "unknown device 'tpu'"),
        ("cuda:7", None, "does not exist on this machine"),
        (None, "float8", "unknown dtype 'float8'"),
        ("cpu", "float16", "float16 does not run on the CPU"),
    ],
)
def test_bad_device_or_dtype_is_one_line(device, dtype, match):
    with pytest.raises(WorkbenchError, match=match) as e:
        RunRequest(
            "head_detectors", "tiny-llama", "induction", device=device, dtype=dtype
        ).resolve()
    assert "\n" not in str(e.value) and e.value.fix


def test_cli_refuses_before_anything_is_queued_or_stored(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    spec = tmp_path / "s.toml"
    spec.write_text(
        textwrap.dedent("""
        [defaults]
        models = ["tiny-llama"]
        [[analysis]]
        name = "head_detectors"
    """)
    )
    for extra in (
        ["--device", "cuda"],
        ["--dtype", "float16"],
        ["--workers", "1", "--device", "x"],
    ):
        assert main(["run", str(spec), "--no-progress", *extra]) == 2
        assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "store" / "results").exists() or not any(
        (tmp_path / "store" / "results").iterdir()
    )
    assert not (tmp_path / "store" / "jobs.sqlite").exists()


def test_float32_keys_are_unchanged_and_bfloat16_has_its_own():
    plain = RunRequest("head_detectors", "tiny-llama", "induction").resolve()
    f32 = RunRequest("head_detectors", "tiny-llama", "induction", dtype="float32").resolve()
    bf16 = RunRequest("head_detectors", "tiny-llama", "induction", dtype="bfloat16").resolve()
    assert plain.run_id == f32.run_id and plain.key == f32.key
    assert bf16.run_id != f32.run_id
    assert bf16.key.model_fingerprint != f32.key.model_fingerprint
    assert check_device(None) == "cpu" and check_dtype(None) == "float32"


def test_bfloat16_runs_hold_their_stated_bounds(load, store):
    from workbench.models.loading import load_model

    f32 = load("tiny-llama")
    bf16 = load_model("tiny-llama", dtype="bfloat16")
    assert bf16.dtype == "bfloat16" and bf16.fingerprint != f32.fingerprint
    assert next(bf16.bridge.parameters()).dtype.__str__() == "torch.bfloat16"
    # through the runner: self-checks (their bf16 tolerance) pass, the result says its dtype
    r16 = run_analysis("head_detectors", bf16, "induction", task_params=IND, store=store)
    r32 = run_analysis("head_detectors", f32, "induction", task_params=IND, store=store)
    assert r16.info["dtype"] == "bfloat16" and r32.info["dtype"] == "float32"
    assert r16.run_id != r32.run_id
    # detector scores are shares of attention in [0, 1]: bf16 within TOLERANCE of float32
    diff = np.abs(r16.heads["value"].to_numpy() - r32.heads["value"].to_numpy()).max()
    assert diff <= TOLERANCE["bfloat16"], diff
    # the exact patching fast path in bf16 against the bf16 slow reference, and against fp32
    ps = build_task("ioi", bf16.codec, {"n_prompts": 4})
    p = ActivationPatchingParams(component="z")
    fast = activation_patching(bf16, ps, p).head_metrics["logit_diff"].mean
    ref = activation_patching(bf16, ps, p, reference=True).head_metrics["logit_diff"].mean
    full = activation_patching(f32, ps, p, reference=True).head_metrics["logit_diff"].mean
    scale = max(1.0, float(np.abs(full).max()))
    assert np.abs(fast - ref).max() <= TOLERANCE["bfloat16"] * scale
    assert np.abs(fast - full).max() <= 2 * TOLERANCE["bfloat16"] * scale


@pytest.mark.parametrize(
    "analysis", ["direct_logit_attribution", "attribution_patching", "path_patching", "logit_lens"]
)
def test_bfloat16_values_of_every_prompt_analysis_stay_within_the_bound(load, tmp_path, analysis):
    """Every value table in bf16 against float32 on the same prompts: within
    ``TOLERANCE["bfloat16"] * max(1, max |float32 value|, max |final logit|)``.

    The logit scale is in the bound because these metrics are differences of logits, and bf16
    rounds each logit relative to its own size (``2^-8 |logit|``), not relative to their
    difference: a logit difference of 0.1 between logits of 6 carries an error of ~0.03."""
    import torch

    from workbench.models.loading import load_model
    from workbench.store import ResultStore

    f32 = load("tiny-llama")
    bf16 = load_model("tiny-llama", dtype="bfloat16")
    tp = {"n_prompts": 4}
    with torch.no_grad():
        clean = build_task("ioi", f32.codec, tp).clean
        logit_scale = float(f32.bridge(clean, prepend_bos=False)[:, -1].abs().max())
    a = run_analysis(analysis, f32, "ioi", task_params=tp, store=ResultStore(tmp_path / "a"))
    b = run_analysis(analysis, bf16, "ioi", task_params=tp, store=ResultStore(tmp_path / "b"))
    checked = 0
    for name, table in a.tables.items():
        if "value" not in table:
            continue
        x, y = table["value"].to_numpy(float), b.tables[name]["value"].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        assert ok.any()
        scale = max(1.0, float(np.abs(x[ok]).max()), logit_scale)
        assert np.abs(x[ok] - y[ok]).max() <= TOLERANCE["bfloat16"] * scale, name
        checked += 1
    assert checked >= 1
