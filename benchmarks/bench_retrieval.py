"""Retrieval-head benchmark: the workbench's faithful and fast modes against a plain-HF port of
the authors' loop (``benchmarks/authors_retrieval.py``) on the same needle samples, and the peak
memory of fast mode on a long context.

Usage: python benchmarks/bench_retrieval.py [--model smollm2-135m] [--length 512] [--depths 12]
       [--rss-length 4096] [--skip-rss] [--threads 1]

``--threads`` (default 1) sets ``torch.set_num_threads``: on this shared 2-core machine two
threads under load from other processes made a 256-token prefill 4-10x and a decoding step
15x slower than one thread (OpenMP threads waiting on each other), so one thread is the
stable setting to compare with.

1. ``--depths`` samples (evenly spaced depths of one haystack, the first shipped needle) at
   ``--length`` tokens, in this process (both sides first run untimed on two samples, since
   the first calls of each shape are slower), timed in wall and CPU seconds:
   - the authors' loop (eager attention, ``output_attentions`` at every step, per-head Python
     loop), with the exact ``real_needle`` span and the workbench's stop rule and step budget
     (``max_new_tokens = 50``, their ``decode_len``); how many spans their own token-set search
     finds is printed too;
   - the workbench's faithful mode with the same definition (``span = "real_needle"``, first
     answer token scored, ROUGE-1 recall with stemming > 0.5): ratio (target >= 3) and
     Spearman over all heads (target >= 0.99), counted samples on both sides;
   - fast mode (``fast_answer = "real_needle"`` and ``"needle"``): samples kept by its greedy
     filter against the faithful mode's counted ones, time, and Spearman against both;
   - the faithful mode without the shared-prefix KV cache and with ``decode_batch = 1``.
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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


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


def top10(x: np.ndarray, n_heads: int) -> str:
    return " ".join(f"L{i // n_heads}H{i % n_heads}" for i in np.argsort(-x, kind="stable")[:10])


def authors(
    model: Any, ns: Any, max_new_tokens: int
) -> tuple[np.ndarray, list[bool], tuple[float, float], int]:
    """The authors' loop on every sample: mean score over counted samples, counted flags,
    (wall, CPU) seconds, and how many spans their own search finds."""
    from authors_retrieval import authors_sample, eager_hf_model, paper_span

    from workbench.analyses.retrieval_heads.hits import sample_spans
    from workbench.forward.decode import is_stop, stop_ids

    hf, tok = eager_hf_model(model.name)
    spans = sample_spans(model, ns.samples, "real_needle")
    stops = stop_ids(model)

    def stop(token: int, so_far: list[int]) -> bool:
        return is_stop(model, token, stops, model.codec.decode(so_far))

    found = sum(paper_span(tok, s.context.tolist(), s.real_needle) != (-1, -1) for s in ns.samples)
    t0, c0 = time.perf_counter(), time.process_time()
    res = [
        authors_sample(
            hf, tok, s.context, span, s.real_needle, decode_len=max_new_tokens, stop=stop
        )
        for s, span in zip(ns.samples, spans, strict=True)
    ]
    secs = (time.perf_counter() - t0, time.process_time() - c0)
    counted = [r.recall > 0.5 for r in res]
    per = np.array([r.score for r in res])
    return per[np.array(counted)].mean(0).ravel(), counted, secs, found


def compare(model_name: str, length: int, n_depths: int) -> None:
    import torch

    from workbench.analyses.retrieval_heads import RetrievalParams
    from workbench.analyses.retrieval_heads.compute import retrieval_heads
    from workbench.analyses.retrieval_heads.teacher_forced import fast_scores
    from workbench.errors import WorkbenchError
    from workbench.models.backend import fast_linears
    from workbench.models.loading import load_model
    from workbench.tasks import build_task

    model = load_model(model_name)
    depths = [round(100 * i / (n_depths - 1), 2) for i in range(n_depths)]
    ns = build_task(
        "needle", model.codec,
        {"context_lengths": [length], "depth_percents": depths, "n_needles": 1},
    )  # fmt: skip
    with torch.no_grad():  # warm-up: first calls through the bridge are slower
        model.bridge(ns.samples[0].context[None, :64], prepend_bos=False, return_type=None)
    print(f"model {model_name}, {ns.n} samples x {length} tokens, depths {depths}, "
          f"{torch.get_num_threads()} torch thread(s)", flush=True)  # fmt: skip
    budget = RetrievalParams().max_new_tokens
    warm = type(ns)(ns.task, ns.samples[:2], ns.prepend_bos, ns.meta)
    authors(model, warm, budget)  # warm-up, untimed: first calls of each shape are slower
    retrieval_heads(model, warm, RetrievalParams())  # (oneDNN builds a kernel per shape)
    ref, ref_counted, (ref_secs, ref_cpu), found = authors(model, ns, budget)
    print(f"authors' loop     {ref_secs:7.1f} s  ({ref_secs / ns.n:.2f} s/sample, CPU "
          f"{ref_cpu:.1f} s), counted "
          f"{sum(ref_counted)}/{ns.n}; their span search finds {found}/{ns.n} spans; "
          f"top-10: {top10(ref, model.n_heads)}", flush=True)  # fmt: skip
    variants = {
        "faithful": RetrievalParams(),
        "faithful/no-reuse": RetrievalParams(reuse_prefix=False),
        "faithful/batch-1": RetrievalParams(decode_batch=1),
    }
    out, secs, cpu = {}, {}, {}
    for name, params in variants.items():
        t0, c0 = time.perf_counter(), time.process_time()
        out[name] = retrieval_heads(model, ns, params)
        secs[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
        info = out[name].info
        print(f"{name:17s} {secs[name]:7.1f} s  ({secs[name] / ns.n:.2f} s/sample, CPU "
              f"{cpu[name]:.1f} s), counted "
              f"{info['n_counted']}/{ns.n}, share of heads > 0.1: {info['share_above_0.1']:.3f}, "
              f"prefix tokens reused {info['reused_prefix_tokens']}/{info['context_tokens']}",
              flush=True)  # fmt: skip
    faithful = out["faithful"].head_metrics["retrieval_score"].mean.ravel()
    counted = out["faithful"].tables["samples"]["counted"].tolist()
    print(f"faithful vs authors' loop: {ref_secs / secs['faithful']:.2f}x faster in wall time, "
          f"{ref_cpu / cpu['faithful']:.2f}x in CPU time (target >= 3), "
          f"Spearman over all {faithful.size} heads {spearman(faithful, ref):.4f} "
          f"(target >= 0.99), max abs difference {np.abs(faithful - ref).max():.2g}, same "
          f"counted samples: {counted == ref_counted}")  # fmt: skip
    print(f"faithful top-10: {top10(faithful, model.n_heads)}")
    for name in ("faithful/no-reuse", "faithful/batch-1"):
        other = out[name].head_metrics["retrieval_score"].mean.ravel()
        print(f"{name}: faithful (CPU) is {cpu[name] / cpu['faithful']:.2f}x faster than this, "
              f"max abs score difference {np.abs(other - faithful).max():.2g}")  # fmt: skip
    for answer in ("real_needle", "needle"):
        params = RetrievalParams(mode="fast", fast_answer=answer)
        c0 = time.process_time()
        with fast_linears(model.bridge):
            scored = fast_scores(model, ns.samples, params)
        dt = time.process_time() - c0
        kept = np.array([s.counted for s in scored])
        both = int((kept & np.array(counted)).sum())
        line = (f"fast/{answer}: CPU {dt:.1f} s ({ref_cpu / dt:.2f}x faster than the authors' "
                f"loop, {cpu['faithful'] / dt:.2f}x than faithful); kept {int(kept.sum())}/{ns.n} "
                f"(faithful counts {sum(counted)}, both {both})")  # fmt: skip
        if kept.any():
            fast = np.stack([s.score.numpy() for s in scored])[kept].mean(0).ravel()
            line += (f"; Spearman vs faithful {spearman(fast, faithful):.3f}, "
                     f"vs authors {spearman(fast, ref):.3f}")  # fmt: skip
        else:
            line += "; no scores (a run would stop with 'no sample counts')"
        print(line, flush=True)
        try:
            retrieval_heads(model, ns, params)
        except WorkbenchError as e:
            print(f"  {e}")
    answers = out["faithful"].tables["samples"]["answer"].unique()[:2]
    print(f"faithful answers (first distinct): {list(answers)}")


def child(model_name: str, length: int) -> None:
    """Fast mode on one sample of ``length`` tokens (run in a child process)."""
    from workbench.analyses.retrieval_heads import RetrievalParams
    from workbench.analyses.retrieval_heads.teacher_forced import fast_scores
    from workbench.models.loading import load_model
    from workbench.tasks import build_task

    model = load_model(model_name)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    ns = build_task(
        "needle", model.codec,
        {"context_lengths": [length], "depth_percents": [50], "n_needles": 1},
    )  # fmt: skip
    t0 = time.perf_counter()
    (out,) = fast_scores(model, ns.samples, RetrievalParams(mode="fast"))
    dt = time.perf_counter() - t0
    print(f"child: peak RSS after load {loaded:.2f} GB; fast mode {dt:.1f} s, recall "
          f"{out.recall:.2f}")  # fmt: skip


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
