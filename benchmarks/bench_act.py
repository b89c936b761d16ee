"""The cost of ACT's per-head search, both sides measured in one run (SmolLM2 by default).

Every head of the model (270 for SmolLM2-135M: 30 layers x 9 heads) is calibrated alone
(``tau`` 0.1, ``beta`` 0.4) on one batch of calibration prompts and each prompt scored
(``act_search.scoring``: margin of gold over the other labels, gold's log-prob among them, its
log-prob over the vocabulary):

- **batched search** (``head_sweep.sweep_heads``, what ``act_search`` runs): one unmodified run
  of the batch, then every head resumes at its own layer from that run's residual, many heads
  per block call, only the final position unembedded;
- **naive loop** (``head_sweep.naive_sweep``): per head, one full forward of the batch inside
  ``calibrate_attention``.

Printed: both wall times, the ratio (target >= 2), the forward-equivalents of the batched side,
and the largest difference of each score between the two (they must agree), plus the machine
load average (other processes slow both sides).

The prompts: the first ``--prompts`` of ``label_choice``'s select split then test split
(``--shots`` demonstrations), each cut from the left to the shortest one's token length so
they form one length group (one tensor); their endings (the text to classify and the label
cue) are kept.

Usage: ``python benchmarks/bench_act.py [--model smollm2-135m] [--prompts 32] [--shots 0]
[--batch-tokens 32768]``.
"""

from __future__ import annotations

import argparse
import os
import time


def calibration_batch(model, n: int, shots: int):
    """``n`` label_choice prompts (select split first) cut to one length, as one PromptSet."""
    from dataclasses import replace

    import torch

    from workbench.analyses.act_search.compute import groups_of
    from workbench.tasks import build_task

    rows = []
    for split in ("select", "test"):
        built = build_task("label_choice", model.codec, {"split": split, "shots": shots})
        for g in groups_of(built):
            rows += [(g.clean[i], g.meta["choices"][i], g.meta["gold_index"][i], g.correct[i],
                      g.incorrect[i]) for i in range(g.n)]  # fmt: skip
    rows = rows[:n]
    t = min(int(r[0].shape[0]) for r in rows)
    first = groups_of(build_task("label_choice", model.codec, {"shots": shots}))[0]
    clean = torch.stack([r[0][-t:] for r in rows])
    meta = {"choices": [r[1] for r in rows], "gold_index": [r[2] for r in rows]}
    return replace(first, clean=clean, corrupt=clean.clone(),
                   correct=torch.stack([r[3] for r in rows]),
                   incorrect=torch.stack([r[4] for r in rows]), prompts=(),
                   corrupt_prompts=(), meta=meta)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--beta", type=float, default=0.4)
    ap.add_argument("--batch-tokens", type=int, default=32768)
    args = ap.parse_args()

    import torch

    from workbench.analyses.act_search.scoring import (
        SCORES,
        answer_choices,
        choice_metric,
        correct,
    )
    from workbench.forward.attention_edits import act_edit, calibrate_attention
    from workbench.forward.head_sweep import naive_sweep, sweep_heads
    from workbench.forward.resume import ResumableRun
    from workbench.runner import ModelPool
    from workbench.types import Head

    model = ModelPool().get(args.model)
    ps = calibration_batch(model, args.prompts, args.shots)
    metric = choice_metric(*answer_choices(ps))
    heads = [[Head(la, h)] for la in range(model.n_layers) for h in range(model.n_heads)]
    load0 = os.getloadavg()[0]
    print(f"{model.name}: {len(heads)} heads x {ps.n} prompts of {ps.seq_len} tokens "
          f"(label_choice, {args.shots} shots); tau {args.tau}, beta {args.beta}; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip

    def ctx(hs):
        return calibrate_attention(model, hs, tau=args.tau, beta=args.beta)

    edit = act_edit(args.tau, args.beta)
    warm = heads[-2:]
    sweep_heads(model, ResumableRun(model, ps.clean), warm, "pattern", edit, metric)  # warm
    naive_sweep(model, ps.clean, warm, ctx, metric)

    t0 = time.perf_counter()
    base = ResumableRun(model, ps.clean)
    fast, cost = sweep_heads(model, base, heads, "pattern", edit, metric,
                             batch_tokens=args.batch_tokens, desc="ACT search")  # fmt: skip
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = naive_sweep(model, ps.clean, heads, ctx, metric)
    t_slow = time.perf_counter() - t0

    a, b = torch.stack(fast), torch.stack(slow)
    diff = {s: float((a[..., i] - b[..., i]).abs().max()) for i, s in enumerate(SCORES)}
    flips = int((correct(a) != correct(b)).sum())
    gains = correct(a).mean(1) - correct(metric(base.final_logits)).mean()
    print(f"batched search: {t_fast:.1f} s ({cost:.1f} forward-equivalents of the batch, "
          f"waves of <= {args.batch_tokens} tokens); naive loop: {t_slow:.1f} s "
          f"({len(heads)} full forwards); ratio {t_slow / t_fast:.2f}x (target >= 2)")  # fmt: skip
    print(f"largest score difference {diff}; correctness differs on {flips} of "
          f"{a.shape[0] * a.shape[1]} head x prompt cells")  # fmt: skip
    load1 = os.getloadavg()[0]
    print(f"calibration accuracy gain per head: {int((gains > 0).sum())} heads > 0, "
          f"{int((gains < 0).sum())} < 0, max {float(gains.max()):+.3f}, min "
          f"{float(gains.min()):+.3f}; load average {load0:.1f} -> {load1:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
