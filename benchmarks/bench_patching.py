"""Activation patching: TransformerLens ``patching`` vs the workbench's fast exact sweep.

Same process, same inputs (SmolLM2-135M, IOI prompt pairs): TL's
``get_act_patch_attn_head_out_all_pos`` vs ``activation_patching(component="z")`` and TL's
``get_act_patch_resid_pre`` vs ``activation_patching(component="resid_pre")`` (metric: mean
logit difference, denoising). Prints both wall times, the ratio, the max abs difference and the
cost in single-forward equivalents (one forward = the whole prompt batch through all layers).

Ours runs ``--reps`` times (median) on each linear backend (see ``workbench.models.backend``):
the default BLAS TL also uses (the algorithm alone) and oneDNN (as shipped where it is faster);
``--tl-onednn`` also times TL with its linear layers on oneDNN.

``--tl-layers K`` times TL on its first K layers only (via ``index_df``) and extrapolates its
full time linearly in the number of indices; the ratio line says so. Default: the full sweep.

Usage: python benchmarks/bench_patching.py [--n-prompts 8] [--tl-layers 0] [--reps 3] [--tl-onednn]
"""

from __future__ import annotations

import argparse
import contextlib
import os
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


def _ours(model: Any, ps: Any, params: Any, backend: str, reps: int) -> tuple[list[float], Any]:
    """Our sweep ``reps`` times with ``WORKBENCH_LINEAR_BACKEND=backend``: times, last output."""
    from workbench.analyses.activation_patching.compute import activation_patching

    old = os.environ.get("WORKBENCH_LINEAR_BACKEND")
    os.environ["WORKBENCH_LINEAR_BACKEND"] = backend
    try:
        times, out = [], None
        for _ in range(reps):
            t = time.perf_counter()
            out = activation_patching(model, ps, params)
            times.append(time.perf_counter() - t)
        return times, out
    finally:
        if old is None:
            os.environ.pop("WORKBENCH_LINEAR_BACKEND", None)
        else:
            os.environ["WORKBENCH_LINEAR_BACKEND"] = old


def main() -> None:
    from transformer_lens import patching

    from workbench.analyses.activation_patching import ActivationPatchingParams
    from workbench.metrics import logit_diff
    from workbench.models.backend import calibrate, fast_linears, onednn_available
    from workbench.models.loading import load_model
    from workbench.tasks import build_task

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--tl-layers", type=int, default=0, help="0: full TL sweep")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3, help="runs of ours per backend (median)")
    ap.add_argument(
        "--tl-onednn",
        action="store_true",
        help="also time TL with its linear layers on oneDNN (the same switch ours uses)",
    )
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = load_model(args.model)
    dt = time.perf_counter() - t0
    print(f"loaded {model!r} in {dt:.1f}s; torch threads {torch.get_num_threads()}")
    if onednn_available():
        blas, dnnl = calibrate()
        print(
            "linear backend calibration ([1024, 576] x [576, 1536]): "
            f"default BLAS {blas * 1e3:.2f} ms, oneDNN {dnnl * 1e3:.2f} ms ({blas / dnnl:.2f}x)"
        )
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
        n_idx_full = int(np.prod([sizes[a] for a in axes]))
        tl_times: dict[str, float] = {}
        tl_out = None  # TL's values on the default backend: the reference for max |diff|
        for tl_backend in ("default", "onednn") if args.tl_onednn else ("default",):
            ctx = fast_linears(bridge) if tl_backend == "onednn" else contextlib.nullcontext(0)
            with ctx:
                t = time.perf_counter()
                tl_vals = tl_sweep(fn, bridge, ps.corrupt, clean_cache, tl_metric, index_df)
                tl_time = time.perf_counter() - t
            if tl_out is None:
                tl_out = tl_vals
            n_idx_run = n_idx_full if index_df is None else len(index_df)
            tl_times[tl_backend] = tl_time * n_idx_full / n_idx_run
        assert tl_out is not None

        params = ActivationPatchingParams(
            component=comp,
            metric="logit_diff",
            direction="denoising",
            batch_tokens=args.batch_tokens,
        )
        ours: dict[str, float] = {}
        diffs: dict[str, float] = {}
        info: dict[str, Any] = {}
        for backend in ("default", "onednn") if onednn_available() else ("default",):
            times, out = _ours(model, ps, params, backend, args.reps)
            ours[backend] = float(np.median(times))
            grid: pd.DataFrame = out.tables["grid"]
            if comp == "z":
                vals = torch.tensor(out.head_metrics["logit_diff"].mean)
            else:
                vals = torch.tensor(grid.pivot(index="layer", columns="pos", values="value").values)
            tl_arr = tl_out.reshape(-1) if index_df is not None else tl_out
            cmp = vals[:tl_layers].reshape(-1) if index_df is not None else vals
            diffs[backend] = float((cmp.double() - tl_arr.double()).abs().max())
            info = out.info
            print(f"  ours ({backend} linears) runs: " + ", ".join(f"{x:.2f}s" for x in times))

        subset = ""
        if index_df is not None:
            subset = (
                f" (TL run on layers 0..{tl_layers - 1}: {len(index_df)} of {n_idx_full} indices, "
                "full time extrapolated linearly: every TL index is one full forward)"
            )
        print(f"\n== {comp}: {n_idx_full} patch indices, batch of {ps.n} prompt pairs ==")
        for tl_backend, tl_full in tl_times.items():
            print(
                f"TL    {fn.func.__name__}/{comp} ({tl_backend} linears): {tl_full:.2f}s{subset}; "
                f"cost {n_idx_full + 1} forwards"
            )
        print(
            f"ours  activation_patching: cost {info['cost_forward_equivalents']:.1f} forward "
            f"equivalents ({info['n_patches_computed']} of {info['n_patches']} cells computed, "
            f"positions recomputed from {info['recomputed_from_pos']}); median of {args.reps}"
        )
        tl_ref = tl_times["default"]
        for backend, t_ours in ours.items():
            label = "as shipped" if backend == "onednn" else "algorithm alone, same BLAS as TL"
            print(
                f"ratio TL/ours ({backend} linears, {label}): {tl_ref / t_ours:.1f}x "
                f"({tl_ref:.2f}s / {t_ours:.2f}s)   max |diff|: {diffs[backend]:.2e}"
            )
        if "onednn" in tl_times and "onednn" in ours:
            both = tl_times["onednn"] / ours["onednn"]
            print(f"ratio TL/ours (both on oneDNN linears): {both:.1f}x")


if __name__ == "__main__":
    main()
