"""Parameter schemas: defaults, unknown keys, type errors, canonical form."""

from __future__ import annotations

import pytest

from workbench import params as P
from workbench.analyses.head_detectors import HeadDetectorParams
from workbench.errors import WorkbenchError
from workbench.registry import get_analysis
from workbench.types import RunKey


def test_defaults_and_canonical_dict():
    p = P.from_mapping(HeadDetectorParams, {"detectors": ["induction"]})
    assert p.detectors == ("induction",) and p.batch_size == 8
    assert P.to_dict(p)["detectors"] == ["induction"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bogus": 1}, "unknown parameter(s) bogus"),
        ({"batch_size": "8"}, "'batch_size' must be int"),
        ({"batch_size": True}, "'batch_size' must be int"),
        ({"error_measure": "l2"}, "one of 'mul', 'abs'"),
        ({"detectors": ["nope"]}, "unknown detector(s)"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_values_are_one_line_errors(values, message):
    with pytest.raises(WorkbenchError) as err:
        P.from_mapping(HeadDetectorParams, values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_analysis():
    with pytest.raises(WorkbenchError, match="unknown analysis 'x'; known analyses: "):
        get_analysis("x")


def test_run_id_depends_on_contents_only():
    base = dict(
        model="m",
        model_fingerprint="f",
        analysis="a",
        params={"b": 1, "a": 2},
        task="t",
        data_hash="d",
        code_version="v",
    )
    k1 = RunKey(**base)
    k2 = RunKey(**{**base, "params": {"a": 2, "b": 1}})
    k3 = RunKey(**{**base, "params": {"a": 2, "b": 2}})
    assert k1.run_id == k2.run_id != k3.run_id
    assert RunKey(**{**base, "model": "alias"}).run_id == k1.run_id  # the name is not content
