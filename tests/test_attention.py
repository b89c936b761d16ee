"""Engine helpers behind the app: attention maps, top keys, grid figures, exports."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from workbench.attention import (
    attended_tokens,
    attention_map,
    head_figure,
    layer_figure,
    token_labels,
    top_keys,
)
from workbench.errors import WorkbenchError
from workbench.export import gather, to_bytes
from workbench.figures import layer_position_figure, layer_position_matrix
from workbench.hooks import hook_name, hooked

TEXT = "When Mary and John went to the store , John gave a drink to"


def test_attention_map_is_the_softmax_of_the_scores(load):
    model = load("tiny-llama")
    amap = attention_map(model, TEXT, 1)
    seen = {}

    def keep(scores, hook):
        seen["s"] = scores[0].detach().float()

    tokens = torch.tensor([amap.tokens])
    with torch.no_grad(), hooked(model.bridge, [(hook_name("scores", 1), keep)]):
        model.bridge(tokens, prepend_bos=False, return_type=None)
    t = len(amap.tokens)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    ref = torch.softmax(seen["s"].masked_fill(~causal, float("-inf")), dim=-1).numpy()
    assert amap.pattern.shape == (model.n_heads, t, t)
    np.testing.assert_allclose(amap.pattern, ref, atol=1e-5)
    assert len(set(amap.labels)) == t
    assert head_figure(amap, 2).data[0].z.shape == (t, t)
    assert len(layer_figure(amap).data) == model.n_heads


def test_attention_map_rejects_bad_input(load):
    model = load("tiny-llama")
    with pytest.raises(WorkbenchError, match="empty"):
        attention_map(model, "  ", 0)
    with pytest.raises(WorkbenchError, match="layer 9"):
        attention_map(model, TEXT, 9)
    with pytest.raises(WorkbenchError, match="context"):
        attention_map(model, " ".join(["Mary"] * (model.codec.n_ctx + 1)), 0)


def _random_pattern(t: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.tril(rng.random((t, t)))
    return a / a.sum(1, keepdims=True)


def test_top_keys_matches_a_loop():
    a = _random_pattern(9)
    labels = token_labels([f"t{i}" for i in range(9)])
    got = top_keys(a, labels, k=3)
    rows = []
    for q in range(9):
        order = sorted(range(q + 1), key=lambda key: (-a[q, key], key))[:3]
        rows += [(q, r + 1, key, a[q, key]) for r, key in enumerate(order)]
    want = pd.DataFrame(rows, columns=["query", "rank", "key", "weight"])
    pd.testing.assert_frame_equal(
        got[["query", "rank", "key", "weight"]].reset_index(drop=True),
        want,
        check_dtype=False,
    )
    assert got.loc[got["query"] == 0, "key"].tolist() == [0]  # only itself is visible


def test_attended_tokens_are_shares_of_the_attention_mass():
    a = _random_pattern(6, seed=1)
    got = attended_tokens(a, token_labels(list("abcdef")), k=6)
    np.testing.assert_allclose(got["share"].sum(), 1.0)
    np.testing.assert_allclose(got.set_index("key")["share"].sort_index(), a.sum(0) / 6)
    assert got["share"].is_monotonic_decreasing


def test_layer_position_grid_and_exports(store):
    from workbench.runner import run_analysis

    res = run_analysis(
        "activation_patching",
        "tiny-llama",
        "ioi",
        params={"component": "resid_pre"},
        task_params={"n_prompts": 2},
        store=store,
    )
    grid = res.tables["grid"]
    mat = layer_position_matrix(grid, "resid_pre")
    for r in grid.sample(5, random_state=0).itertuples():
        assert mat.loc[r.layer, r.pos] == pytest.approx(r.value)
    assert layer_position_figure(grid, "resid_pre").data[0].z.shape == mat.shape
    with pytest.raises(WorkbenchError, match="no layer x position"):
        layer_position_matrix(grid, "mlp_out")
    table = gather(store, [res.run_id[:8]], "grid")
    for fmt, read in (
        ("csv", pd.read_csv),
        ("parquet", pd.read_parquet),
        ("json", pd.read_json),
    ):
        back = read(io.BytesIO(to_bytes(table, fmt)))
        assert len(back) == len(grid)
        np.testing.assert_allclose(back["value"], grid["value"])
    with pytest.raises(WorkbenchError, match="no table"):
        gather(store, [res.run_id], "nope")
