"""The cost of evaluating KV-cache plans, both sides measured in one run (SmolLM2 by default).

1. **Whole evaluation** (``kv_plan_eval.compute.evaluate``: full attention's reference once per
   sample, the first ``sink + window`` positions prefilled once per sample and shared by every
   plan, then per plan one prefill of the rest, the answer teacher-forced on a copy of that
   cache and greedy decoding from it) against the **naive loop** (per plan and sample: one
   teacher-forced forward over context + answer, then greedy decoding with its own prefill;
   nothing shared), on the same samples and plans (the razor plan + ``--random`` uniform random
   plans of its size): wall time, forward-equivalents (tokens processed / context length),
   ratios, and the largest metric difference between the two (they must agree).
2. **Mask mode's price**: one forward per sample under the plan against unmodified forwards of
   the same samples (the acceptance target is at most 1.3x).
3. **decode vs mask**: time per sample of one plan's evaluation in each mode.
4. **Peak RSS** of one ``--long``-token decode-mode evaluation, in a fresh subprocess each for
   the razor plan and the all-full plan, with the KV-cache bytes each really held at the end
   (decode mode removes the entries of layers whose every KV head streams).
5. **Layer sharing** (``kv_plan_eval/shared.py``) on ``--share-model`` (Gemma 3: only its global
   layers 5, 11, 17 can stream, so its 8 plans start streaming at different depths): all 8 plans
   on ``--share-samples`` needle samples with every plan resumed at its first streaming layer
   from one full-attention run per sample, against the same evaluation with each plan's own
   context forward (prefix still shared): time, forward-equivalents, ratio, metric difference.

Usage: ``python benchmarks/bench_kvplans.py [--model smollm2-135m] [--samples 12] [--ctx 1024]
[--random 20] [--long 2048] [--share-model gemma3-270m] [--share-samples 3]
[--only-rss | --only-share | --only-decode]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def samples_for(model, n: int, ctx: int):
    from workbench.tasks import build_task

    needles = max(1, (n + 2) // 3)
    depths = [10, 30, 50][: max(1, min(3, n))]
    task = {"context_lengths": [ctx], "depth_percents": depths, "n_needles": needles}
    built = build_task("needle", model.codec, task)
    return list(getattr(built, "samples", ()))[:n]


def razor_plan(model, store):
    import numpy as np

    from workbench.circuits.kvplans import build_plan, kv_scores
    from workbench.forward.streaming import native_windows
    from workbench.runner import run_analysis

    n_ctx = model.codec.n_ctx
    task = {"n_prompts": 2} if n_ctx >= 1600 else {"n_prompts": 2, "length": n_ctx // 4}
    s = run_analysis("kv_head_scores", model, task_params=task, store=store)
    grid = (model.n_layers, model.n_kv_heads)
    kv = s.tables["kv_heads"]
    scores = {m: np.asarray(kv_scores(kv, m, grid)) for m in ("induction", "echo")}
    return build_plan(model.name, "razor", scores, sink=4, window=256,
                      native=native_windows(model), sources=[s.run_id])  # fmt: skip


def naive(model, plans, samples, params):
    """Per plan and sample: a teacher-forced forward and a separate greedy decode."""
    import torch

    from workbench.analyses.kv_plan_eval.compute import _metrics, _reference
    from workbench.forward.decode import answer_recall, greedy_answers, stop_ids
    from workbench.forward.streaming import StreamAttention

    stops = stop_ids(model)
    refs = [_reference(model, s) for s in samples]
    rows, tokens = [], sum(int(s.context.shape[0] + s.answer.shape[0]) - 1 for s in samples)
    for name, plan in plans.items():
        for i, s in enumerate(samples):
            n, m = int(s.context.shape[0]), int(s.answer.shape[0])
            ids = torch.cat([s.context, s.answer[:-1]]).to(model.device)[None]
            with StreamAttention(model, plan), torch.no_grad():
                lp = torch.log_softmax(
                    model.bridge(ids, prepend_bos=False, return_type="logits")[0].float(), -1
                )
                (dec,) = greedy_answers(
                    model, [s], max_new_tokens=params.max_new_tokens, reuse=False
                )
            start = min(n - 1, plan.sink + plan.window)
            stop = min(start + params.ppl_tokens, n - 1)
            out = _metrics(
                lp[n - 1 :], refs[i], s.answer, lp[start:stop], s.context[start + 1 : stop + 1]
            )
            out["recall"] = answer_recall(model, s, dec.tokens, stops)
            rows.append({"plan": name, "sample": i, **out})
            tokens += n + m - 1 + n + len(dec.tokens)
    return rows, tokens


def peak_rss_child(model_name: str, n: int, plan_json: str) -> None:
    """Run in a subprocess: one decode-mode evaluation of an ``n``-token sample under the plan
    in ``plan_json`` (so nothing else raised the high-water mark first); prints JSON."""
    from workbench.analyses.kv_plan_eval import KVPlanEvalParams
    from workbench.analyses.kv_plan_eval.compute import evaluate
    from workbench.forward.plan import KVPlan
    from workbench.runner import ModelPool

    model = ModelPool().get(model_name)
    plan = KVPlan.from_dict(json.loads(Path(plan_json).read_text()))
    sample = samples_for(model, 1, n)
    import threading

    import psutil

    me = psutil.Process()
    before, peak, done = me.memory_info().rss, [0], threading.Event()

    def watch() -> None:  # the load's own high-water mark (ru_maxrss) hides the evaluation's
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    params = KVPlanEvalParams(scores_run="x", mode="decode", max_new_tokens=16)
    table, _ = evaluate(model, {"plan": plan}, sample, params)
    done.set()
    watcher.join()
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = model.cfg  # the unmodified cache of the context: keys and values, fp32
    full = model.n_layers * model.n_kv_heads * cfg.d_head * 2 * 4 * int(sample[0].context.numel())
    print(json.dumps({"seconds": time.perf_counter() - t0, "rss_before_mib": before / 2**20,
                      "peak_rss_mib": peak[0] / 2**20, "ru_maxrss_mib": high,
                      "cache_fraction": float(table["cache_fraction"].mean()),
                      "full_cache_mib": full / 2**20}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--random", type=int, default=20)
    ap.add_argument("--long", type=int, default=2048)
    ap.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--only-rss", action="store_true", help="just the peak-RSS measurement")
    ap.add_argument("--share-model", default="gemma3-270m")
    ap.add_argument("--share-samples", type=int, default=3)
    ap.add_argument("--only-share", action="store_true", help="just the layer-sharing part")
    ap.add_argument("--only-decode", action="store_true", help="just decode vs mask (part 3)")
    args = ap.parse_args()
    if args.rss_child:
        peak_rss_child(args.model, args.long, args.rss_child)
        return

    import tempfile

    import pandas as pd
    import torch

    from workbench.analyses.kv_plan_eval import KVPlanEvalParams
    from workbench.analyses.kv_plan_eval.compute import METRICS, evaluate
    from workbench.circuits.kvplans import controls
    from workbench.forward.streaming import plan_logits
    from workbench.runner import ModelPool
    from workbench.store import ResultStore

    if args.only_share:
        layer_sharing(args)
        return
    model = ModelPool().get(args.model)
    tmp = Path(tempfile.mkdtemp())
    plan = razor_plan(model, ResultStore(tmp / "store"))
    (tmp / "plan.json").write_text(plan.to_json())
    (tmp / "full.json").write_text(controls(plan, 0, seed=0)["all_full"].to_json())
    if args.only_rss:
        rss(args, tmp)
        return
    samples = samples_for(model, args.samples, args.ctx)
    if args.only_decode:
        decode_vs_mask(model, plan, samples)
        return
    ctl = controls(plan, args.random, seed=0)
    plans = {"plan": plan, **{k: v for k, v in ctl.items() if k.startswith("random_u")}}
    params = KVPlanEvalParams(scores_run="x", max_new_tokens=16)
    print(f"{model.name}: {plan}; {len(samples)} samples x {len(plans)} plans at {args.ctx} "
          f"tokens; kv_fraction {plan.kv_fraction(args.ctx):.3f}")  # fmt: skip

    evaluate(model, {"plan": plan}, samples[:1], params)  # warm both paths once
    naive(model, {"plan": plan}, samples[:1], params)
    t0 = time.perf_counter()
    ours, acct = evaluate(model, plans, samples, params)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows, naive_tokens = naive(model, plans, samples, params)
    t_naive = time.perf_counter() - t0
    theirs = pd.DataFrame(rows).set_index(["plan", "sample"])
    mine = ours.set_index(["plan", "sample"]).loc[theirs.index]
    diff = {m: float((mine[m] - theirs[m]).abs().max()) for m in METRICS}
    fe_ours, fe_naive = acct["forward_equivalents"], naive_tokens / args.ctx
    print(f"whole evaluation: {t_ours:.1f} s, {fe_ours:.0f} forward-equivalents; naive loop "
          f"{t_naive:.1f} s, {fe_naive:.0f}; speed-up {t_naive / t_ours:.2f}x, forward ratio "
          f"{fe_naive / fe_ours:.2f}x; largest metric difference {diff}")  # fmt: skip

    ids = [s.context.to(model.device)[None] for s in samples]
    with torch.no_grad():
        model.bridge(ids[0], prepend_bos=False, return_type="logits")  # warm
        t0 = time.perf_counter()
        for x in ids:
            model.bridge(x, prepend_bos=False, return_type="logits")
        t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    for x in ids:
        plan_logits(model, plan, x)
    t_mask = time.perf_counter() - t0
    print(f"mask mode: {t_mask:.2f} s for {len(ids)} forwards vs {t_plain:.2f} s unmodified: "
          f"{t_mask / t_plain:.2f}x (target <= 1.3x)")  # fmt: skip

    decode_vs_mask(model, plan, samples)
    rss(args, tmp)
    layer_sharing(args)


def decode_vs_mask(model, plan, samples) -> None:
    """Part 3: one plan's evaluation per sample in mask mode and in decode mode."""
    from workbench.analyses.kv_plan_eval import KVPlanEvalParams
    from workbench.analyses.kv_plan_eval.compute import evaluate
    from workbench.forward.eviction import decode_with_eviction

    one, n = {"plan": plan}, min(4, len(samples))
    t0 = time.perf_counter()
    evaluate(model, one, samples[:n], KVPlanEvalParams(scores_run="x", max_new_tokens=16))
    per_mask = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    evaluate(model, one, samples[:n], KVPlanEvalParams(scores_run="x", mode="decode",
                                                       max_new_tokens=16))  # fmt: skip
    per_decode = (time.perf_counter() - t0) / n
    dec = decode_with_eviction(model, plan, samples[0].context, feed_last=50)
    fed = dec.logits.shape[0]
    print(f"per sample: mask {per_mask:.2f} s, decode {per_decode:.2f} s "
          f"({per_decode / per_mask:.2f}x); decode fed {fed} tokens singly; KV cache held "
          f"{dec.cache_fraction:.3f} of the unmodified")  # fmt: skip


def layer_sharing(args: argparse.Namespace) -> None:
    import itertools

    from workbench.analyses.kv_plan_eval import KVPlanEvalParams
    from workbench.analyses.kv_plan_eval.compute import METRICS, evaluate
    from workbench.analyses.kv_plan_eval.shared import first_layer
    from workbench.forward.plan import KVPlan
    from workbench.forward.streaming import native_windows
    from workbench.runner import ModelPool

    model = ModelPool().get(args.share_model)
    grid = (model.n_layers, model.n_kv_heads)
    native = tuple(sorted(native_windows(model).items()))
    none = frozenset((lay, g) for lay, _ in native for g in range(model.n_kv_heads))
    base = KVPlan(model.name, grid, none, 4, 256, native=native)
    pool = base.streamable
    subsets = [c for k in range(len(pool) + 1) for c in itertools.combinations(pool, k)]
    plans = {"+".join(f"L{a}" for a, _ in c) or "none": base.replace(c, "oracle") for c in subsets}
    samples = samples_for(model, args.share_samples, args.ctx)
    params = KVPlanEvalParams(scores_run="x", max_new_tokens=16)
    firsts = sorted(first_layer(model, p) for p in plans.values())
    print(f"{model.name}: {len(plans)} plans x {len(samples)} samples at {args.ctx} tokens; "
          f"first streaming layers {firsts} of {model.n_layers}")  # fmt: skip
    evaluate(model, {"none": plans["none"]}, samples[:1], params)  # warm
    t0 = time.perf_counter()
    on, acct_on = evaluate(model, plans, samples, params)
    t_on = time.perf_counter() - t0
    t0 = time.perf_counter()
    off, acct_off = evaluate(model, plans, samples, params, layer_sharing=False)
    t_off = time.perf_counter() - t0
    diff = max(float((on[m] - off[m]).abs().max()) for m in METRICS)
    fe_on, fe_off = acct_on["forward_equivalents"], acct_off["forward_equivalents"]
    print(f"layer sharing: {t_on:.1f} s, {fe_on:.1f} forward-equivalents; each plan's own "
          f"forward {t_off:.1f} s, {fe_off:.1f}; speed-up {t_off / t_on:.2f}x, forward ratio "
          f"{fe_off / fe_on:.2f}x; largest metric difference {diff:.2g}")  # fmt: skip


def rss(args: argparse.Namespace, tmp: Path) -> None:
    """Part 4: the razor plan (``plan.json``) and the all-full plan (``full.json``), each in a
    fresh process."""
    extra = {}
    for name in ("plan", "full"):
        child = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(tmp / f"{name}.json"), "--model",
             args.model, "--long", str(args.long)],
            check=True, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        out = json.loads(child.stdout.strip().splitlines()[-1])
        peak, loaded = out["peak_rss_mib"], out["rss_before_mib"]
        extra[name] = peak - loaded
        held = out["cache_fraction"] * out["full_cache_mib"]
        print(f"decode evaluation at {args.long} tokens, {name} plan: {out['seconds']:.1f} s, "
              f"peak RSS during it {peak:.0f} MiB (model loaded: {loaded:.0f} MiB, "
              f"+{peak - loaded:.0f}; the load's own high-water mark "
              f"{out['ru_maxrss_mib']:.0f} MiB); KV cache held at the end {held:.1f} MiB = "
              f"{out['cache_fraction']:.3f} of {out['full_cache_mib']:.1f}")  # fmt: skip
    print(f"extra RSS of the razor plan's decode / the all-full plan's: "
          f"{extra['plan'] / extra['full']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
