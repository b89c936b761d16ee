"""Retrieval-head benchmark: fast (teacher-forced) vs faithful (greedy decoding) mode on the
same needle samples, and the peak memory of fast mode on a long context.

Usage: python benchmarks/bench_retrieval.py [--model smollm2-135m] [--length 512] [--depths 12]
       [--rss-length 4096] [--skip-rss] [--threads 1]

``--threads`` (default 1) sets ``torch.set_num_threads``: on this shared 2-core machine two
threads under load from other processes made a 256-token prefill 4-10x and a decoding step
15x slower than one thread (OpenMP threads waiting on each other), so one thread is the
stable setting to compare the two modes with.

1. ``--depths`` samples (evenly spaced depths of one haystack) at ``--length`` tokens, both
   modes in this process (a warm-up forward first): times, ratio (target >= 3), top-10 overlap
   (target >= 9/10) and Spearman rank correlation over all heads (target >= 0.9), for the fast
   mode forced with ``real_needle`` and with the whole needle sentence; and the faithful mode
   without the shared-prefix KV cache (its speed-up, and whether the scores are identical).
2. Fast mode on one ``--rss-length``-token sample in a child process; its peak RSS
   (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, target <= 3 GB).
Prints both sides and their ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's rho."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inv = np.unique(x, return_inverse=True)
    sums = np.bincount(inv, weights=r)
    counts = np.bincount(inv)
    return (sums / counts)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def compare(model_name: str, length: int, n_depths: int) -> None:
    import torch

    from workbench.methods.retrieval.analysis import retrieval_heads
    from workbench.methods.retrieval.schemas import RetrievalParams
    from workbench.models.loading import load_model
    from workbench.tasks import build_task

    model = load_model(model_name)
    depths = [round(100 * i / (n_depths - 1), 2) for i in range(n_depths)]
    ns = build_task("needle", model.codec, {"context_lengths": [length], "depth_percents": depths})
    with torch.no_grad():  # warm-up: first calls through the bridge are slower
        model.bridge(ns.samples[0].context[None, :64], prepend_bos=False, return_type=None)
    variants = {
        "fast": RetrievalParams(mode="fast"),
        "fast/needle": RetrievalParams(mode="fast", fast_answer="needle"),
        "faithful": RetrievalParams(mode="faithful"),
        "faithful/no-reuse": RetrievalParams(mode="faithful", reuse_prefix=False),
    }
    out, secs = {}, {}
    for name, params in variants.items():
        t0 = time.perf_counter()
        out[name] = retrieval_heads(model, ns, params)
        secs[name] = time.perf_counter() - t0
        info = out[name].info
        share, reused = info["share_above_0.1"], info["reused_prefix_tokens"]
        print(f"{name:11s} {secs[name]:7.1f} s  ({secs[name] / ns.n:.2f} s/sample), counted "
              f"{info['n_counted']}/{ns.n}, share of heads > 0.1: {share:.3f}, "
              f"prefix tokens reused {reused}/{info['context_tokens']}", flush=True)  # fmt: skip
    print(f"model {model_name}, {ns.n} samples x {length} tokens, depths {depths}, "
          f"{torch.get_num_threads()} torch thread(s)")  # fmt: skip
    faithful = out["faithful"].head_metrics["retrieval_score"].mean.ravel()
    for name in ("fast", "fast/needle"):
        fast = out[name].head_metrics["retrieval_score"].mean.ravel()
        top = [set(np.argsort(-x, kind="stable")[:10].tolist()) for x in (fast, faithful)]
        print(f"{name} (teacher-forced {variants[name].fast_answer}) vs faithful: "
              f"ratio {secs['faithful'] / secs[name]:.2f}x (target >= 3), "
              f"top-10 overlap {len(top[0] & top[1])}/10 (target >= 9), "
              f"Spearman over all {fast.size} heads {spearman(fast, faithful):.3f} "
              "(target >= 0.9)")  # fmt: skip
    diff = np.abs(
        out["faithful"].head_metrics["retrieval_score"].mean
        - out["faithful/no-reuse"].head_metrics["retrieval_score"].mean
    ).max()
    print(f"shared-prefix KV reuse: faithful {secs['faithful/no-reuse']:.1f} s without, "
          f"{secs['faithful']:.1f} s with ({secs['faithful/no-reuse'] / secs['faithful']:.2f}x), "
          f"max abs score difference {diff:.2g}")  # fmt: skip
    n_heads = model.n_heads
    names = [f"L{i // n_heads}H{i % n_heads}" for i in np.argsort(-faithful)[:10]]
    print(f"faithful top-10: {' '.join(names)}")
    answers = out["faithful"].tables["samples"]["answer"].unique()[:2]
    print(f"faithful answers (first distinct): {list(answers)}")


def child(model_name: str, length: int) -> None:
    """Fast mode on one sample of ``length`` tokens (run in a child process)."""
    from workbench.methods.retrieval.analysis import retrieval_heads
    from workbench.methods.retrieval.schemas import RetrievalParams
    from workbench.models.loading import load_model
    from workbench.tasks import build_task

    model = load_model(model_name)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    ns = build_task("needle", model.codec, {"context_lengths": [length], "depth_percents": [50]})
    t0 = time.perf_counter()
    out = retrieval_heads(model, ns, RetrievalParams(mode="fast"))
    dt = time.perf_counter() - t0
    print(f"child: peak RSS after load {loaded:.2f} GB; fast mode {dt:.1f} s, recall "
          f"{out.tables['samples']['recall'][0]:.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--depths", type=int, default=12)
    ap.add_argument("--rss-length", type=int, default=4096)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        child(args.model, args.rss_length)
        return
    compare(args.model, args.length, args.depths)
    if not args.skip_rss:
        cmd = [sys.executable, __file__, "--child", "--model", args.model,
               "--rss-length", str(args.rss_length), "--threads", str(args.threads)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"child failed:\n{proc.stderr[-2000:]}")
        print(proc.stdout.strip())
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        print(f"fast mode at {args.rss_length} tokens: peak RSS {peak:.2f} GB (target <= 3)")


if __name__ == "__main__":
    main()
