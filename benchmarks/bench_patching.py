"""Activation patching: TransformerLens ``patching`` vs the workbench's fast exact sweep.

Same process, same inputs (SmolLM2-135M, IOI prompt pairs): TL's
``get_act_patch_attn_head_out_all_pos`` vs ``activation_patching(component="z")`` and TL's
``get_act_patch_resid_pre`` vs ``activation_patching(component="resid_pre")`` (metric: mean
logit difference, denoising). Prints both wall times, the ratio, the max abs difference and the
cost in single-forward equivalents (one forward = the whole prompt batch through all layers).

``--tl-layers K`` times TL on its first K layers only (via ``index_df``) and extrapolates its
full time linearly in the number of indices; the ratio line says so. Default: the full sweep.

Usage: python benchmarks/bench_patching.py [--n-prompts 8] [--tl-layers 0]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pandas as pd
import torch


def tl_sweep(fn: Any, model: Any, corrupt: Any, cache: Any, metric: Any, index_df: Any) -> Any:
    """TL's sweep; on a subset of indices through the same generic function it wraps."""
    from transformer_lens import patching

    if index_df is None:
        return fn(model, corrupt, cache, metric)
    kw = fn.keywords
    return patching.generic_activation_patch(
        model,
        corrupt,
        cache,
        metric,
        patch_setter=kw["patch_setter"],
        activation_name=kw["activation_name"],
        index_df=index_df,
    )


def main() -> None:
    from transformer_lens import patching

    from workbench.methods.patching import ActivationPatchingParams, activation_patching
    from workbench.metrics import logit_diff
    from workbench.models.loading import load_model
    from workbench.tasks import build_task

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--tl-layers", type=int, default=0, help="0: full TL sweep")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = load_model(args.model)
    dt = time.perf_counter() - t0
    print(f"loaded {model!r} in {dt:.1f}s; torch threads {torch.get_num_threads()}")
    ps = build_task("ioi", model.codec, {"n_prompts": args.n_prompts})
    print(f"prompts: {ps!r}, first_diff_pos={ps.meta.get('first_diff_pos')}")
    bridge = model.bridge

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits[:, -1], ps.correct, ps.incorrect).mean()

    _, clean_cache = bridge.run_with_cache(ps.clean, prepend_bos=False)
    n_layers = model.n_layers

    for comp, fn, axes in (
        ("z", patching.get_act_patch_attn_head_out_all_pos, ("layer", "head")),
        ("resid_pre", patching.get_act_patch_resid_pre, ("layer", "pos")),
    ):
        sizes = {"layer": n_layers, "head": model.n_heads, "pos": ps.seq_len}
        tl_layers = args.tl_layers or n_layers
        index_df = None
        if tl_layers < n_layers:
            sub = dict(sizes, layer=tl_layers)
            index_df = patching.make_df_from_ranges([sub[a] for a in axes], list(axes))
            index_df.columns = ["layer", "head_index" if comp == "z" else "pos"]
        t = time.perf_counter()
        tl_out = tl_sweep(fn, bridge, ps.corrupt, clean_cache, tl_metric, index_df)
        tl_time = time.perf_counter() - t
        n_idx_full = int(np.prod([sizes[a] for a in axes]))
        n_idx_run = n_idx_full if index_df is None else len(index_df)
        tl_full = tl_time * n_idx_full / n_idx_run

        params = ActivationPatchingParams(
            component=comp,
            metric="logit_diff",
            direction="denoising",
            batch_tokens=args.batch_tokens,
        )
        t = time.perf_counter()
        out = activation_patching(model, ps, params)
        ours_time = time.perf_counter() - t

        grid: pd.DataFrame = out.tables["grid"]
        if comp == "z":
            ours = torch.tensor(out.head_metrics["logit_diff"].mean)
        else:
            ours = torch.tensor(grid.pivot(index="layer", columns="pos", values="value").values)
        tl_arr = tl_out.reshape(-1) if index_df is not None else tl_out
        ours_cmp = ours[:tl_layers].reshape(-1) if index_df is not None else ours
        diff = float((ours_cmp.double() - tl_arr.double()).abs().max())
        subset = ""
        if index_df is not None:
            subset = (
                f" (TL run on layers 0..{tl_layers - 1}: {n_idx_run} of {n_idx_full} indices, "
                "full time extrapolated linearly: every TL index is one full forward)"
            )
        info = out.info
        print(f"\n== {comp}: {n_idx_full} patch indices, batch of {ps.n} prompt pairs ==")
        print(f"TL    {fn.func.__name__}/{comp}: {tl_time:.2f}s measured{subset}")
        print(f"      full sweep {tl_full:.2f}s; cost {n_idx_full + 1} forwards")
        print(
            f"ours  activation_patching: {ours_time:.2f}s; cost "
            f"{info['cost_forward_equivalents']:.1f} forward equivalents "
            f"({info['n_patches_computed']} of {info['n_patches']} cells computed, "
            f"positions recomputed from {info['recomputed_from_pos']})"
        )
        print(f"ratio TL/ours: {tl_full / ours_time:.1f}x   max |diff|: {diff:.2e}")


if __name__ == "__main__":
    main()
