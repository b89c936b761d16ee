"""Train the toy induction model shipped in ``data/toy_induction/`` and measure its mechanism.

The model is a two-layer, four-head GPT-2 (d_model 64, d_head 16, MLP 128) over the
word-level symbol vocabulary of :func:`workbench.models.tiny.word_tokenizer`. It is trained
with the next-token loss on every position of repeated random sequences
``[<bos>, p_1..p_P, x_1..x_L, x_1..x_L]`` of distinct symbols, ``L`` and ``P`` drawn per batch.
The first copy is unpredictable; the second can only be predicted by an induction circuit: a
previous-token head writes "my predecessor was A" into each position, and an induction head in
the next layer, at a query holding ``A``, attends to the position after the earlier ``A`` and
copies its token (Elhage et al. 2021; Olsson et al. 2022).

Two choices make training find that circuit, with a single induction head:

- the filler prefix ``p`` (length 0..``--max-prefix``) moves the first copy around; without it
  the copy always starts at position 1 and a purely positional solution is learned instead;
- few symbols (``--n-symbols 20``): one head's OV circuit has rank ``d_head = 16``, so with 64
  symbols the copying is split over several heads of similar induction score.

After training nothing is assumed about which heads do this; the script measures, through a
TransformerLens bridge on fresh sequences ``[<bos>, x_1..x_L, x_1..x_L]`` with
``L = --eval-len``:

- induction score of head (l, h): the mean attention from each second-copy query ``q = L + i``
  (token ``x_i``) to key ``q - L + 1``, the position right after the token's previous occurrence
  (TransformerLens' head-detector induction pattern);
- previous-token score: the mean attention from each query ``q >= 2`` to key ``q - 1``;
- loss and accuracy on the predictable part of the second copy (targets ``x_2..x_L``), and the
  same with a head's output zeroed at ``blocks.{l}.attn.hook_z``.

It writes the files only when the induction head is clear (accuracy > 0.9, the top induction
score at least ``--min-margin`` above the next); otherwise it exits with status 1 (try another
``--seed``) unless ``--force``.

Usage: ``python scripts/train_toy_induction.py [--seed S] [--steps N] [--out DIR]``. The defaults
(seed 0, 6000 steps, one CPU thread) reproduce the shipped weights bit for bit in ~2.5 minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workbench.home import data_dir
from workbench.models.tiny import (
    boot_bridge,
    repeated_tokens,
    save_state_dict,
    tiny_hf_model,
    word_tokenizer,
)

N_CTX = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-symbols", type=int, default=20)
    p.add_argument("--min-len", type=int, default=5, help="shortest copy length in training")
    p.add_argument("--max-len", type=int, default=20, help="longest copy length in training")
    p.add_argument("--max-prefix", type=int, default=10, help="longest filler prefix (0: none)")
    p.add_argument("--eval-len", type=int, default=16, help="copy length of the measurement")
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--min-margin", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1, help="1 keeps runs bit-identical")
    p.add_argument("--force", action="store_true", help="write the files even if unclear")
    p.add_argument("--out", type=Path, default=data_dir() / "toy_induction")
    args = p.parse_args(argv)
    if 1 + args.max_prefix + 2 * args.max_len > N_CTX:
        p.error(f"1 + max_prefix + 2 * max_len must fit in n_ctx = {N_CTX}")
    if not 1 <= args.min_len <= min(args.max_len, args.n_symbols - args.max_prefix):
        p.error("need 1 <= min_len <= max_len and min_len + max_prefix <= n_symbols")
    return args


def second_half_metrics(
    logits: torch.Tensor, tokens: torch.Tensor, half_len: int
) -> tuple[float, float]:
    """Mean loss and accuracy predicting ``x_2..x_L`` of the second copy.

    In ``[<bos>, x_1..x_L, x_1..x_L]`` the second copy sits at positions ``L+1..2L``; the
    predictions of ``x_2..x_L`` there are made at positions ``L+1..2L-1``.
    """
    pred_pos = torch.arange(half_len + 1, 2 * half_len)
    lp = logits[:, pred_pos].log_softmax(-1)
    target = tokens[:, pred_pos + 1]
    loss = -lp.gather(-1, target[..., None]).squeeze(-1).mean()
    acc = (lp.argmax(-1) == target).float().mean()
    return float(loss), float(acc)


def head_scores(patterns: list[torch.Tensor], half_len: int) -> dict[str, list[list[float]]]:
    """Induction and previous-token scores, ``[layer][head]``, from ``[batch head q k]``."""
    q_ind = torch.arange(half_len + 1, 2 * half_len + 1)
    q_prev = torch.arange(2, 2 * half_len + 1)
    induction, previous = [], []
    for pattern in patterns:
        induction.append(pattern[:, :, q_ind, q_ind - half_len + 1].mean(dim=(0, 2)).tolist())
        previous.append(pattern[:, :, q_prev, q_prev - 1].mean(dim=(0, 2)).tolist())
    return {"induction": induction, "previous_token": previous}


def argmax_head(scores: list[list[float]]) -> tuple[list[int], float, float]:
    """``([layer, head], best, runner_up)`` of a ``[layer][head]`` score table."""
    flat = sorted(
        ((s, layer, head) for layer, row in enumerate(scores) for head, s in enumerate(row)),
        reverse=True,
    )
    (best, layer, head), (second, _, _) = flat[0], flat[1]
    return [layer, head], best, second


def train(args: argparse.Namespace, vocab_size: int) -> tuple[Any, list[list[float]]]:
    """Train the GPT-2 toy; returns the model (eval mode) and ``[step, loss, acc]`` rows."""
    model = tiny_hf_model(
        "gpt2", vocab_size, seed=args.seed, n_layers=2, n_heads=4, d_model=64, n_ctx=N_CTX,
        d_mlp=128, initializer_range=0.02,
    )  # fmt: skip
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / args.steps)
    )
    lengths = torch.Generator().manual_seed(args.seed)
    probe_len = min(args.eval_len, args.n_symbols)
    probe = repeated_tokens(64, probe_len, args.n_symbols, seed=args.seed + 999)
    history = []
    for step in range(args.steps):
        half_len = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=lengths))
        prefix_len = int(torch.randint(0, args.max_prefix + 1, (1,), generator=lengths))
        half_len = min(half_len, args.n_symbols - prefix_len)  # keep all symbols distinct
        tokens = repeated_tokens(
            args.batch, half_len, args.n_symbols, seed=args.seed * 10**6 + step,
            prefix_len=prefix_len,
        )  # fmt: skip
        logits = model(tokens).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            with torch.no_grad():
                _, acc = second_half_metrics(model(probe).logits, probe, probe_len)
            history.append([step, round(loss.item(), 4), round(acc, 4)])
            print(f"step {step:5d}  loss {loss.item():.4f}  2nd-copy acc {acc:.3f}", flush=True)
    return model.eval(), history


def measure(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Scores, second-copy metrics and single-head ablations, through a bridge."""
    bridge = boot_bridge(copy.deepcopy(model), tokenizer, "workbench/toy-induction")
    half_len = args.eval_len
    eval_seed = args.seed + 12345
    tokens = repeated_tokens(args.eval_batch, half_len, args.n_symbols, seed=eval_seed)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(bridge.cfg.n_layers)]
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, prepend_bos=False, names_filter=names)
    scores = head_scores([cache[n] for n in names], half_len)
    induction_head, ind_best, ind_second = argmax_head(scores["induction"])
    prev_head, prev_best, prev_second = argmax_head(scores["previous_token"])
    loss, acc = second_half_metrics(logits, tokens, half_len)

    def ablated(layer: int, head: int) -> tuple[float, float]:
        def zero_head(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            z[:, :, head] = 0.0
            return z

        with torch.no_grad():
            out = bridge.run_with_hooks(
                tokens, prepend_bos=False, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)]
            )
        return second_half_metrics(out, tokens, half_len)

    abl_ind_loss, abl_ind_acc = ablated(*induction_head)
    abl_prev_loss, abl_prev_acc = ablated(*prev_head)
    return {
        "induction_head": induction_head,
        "previous_token_head": prev_head,
        "scores": {
            **scores,
            "induction_top": ind_best,
            "induction_runner_up": ind_second,
            "previous_token_top": prev_best,
            "previous_token_runner_up": prev_second,
        },
        "second_half_loss": loss,
        "second_half_accuracy": acc,
        "ablated_induction_head_second_half_loss": abl_ind_loss,
        "ablated_induction_head_second_half_accuracy": abl_ind_acc,
        "ablated_previous_token_head_second_half_loss": abl_prev_loss,
        "ablated_previous_token_head_second_half_accuracy": abl_prev_acc,
        "eval": {"half_len": half_len, "batch": args.eval_batch, "seed": eval_seed},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    tokenizer = word_tokenizer(n_symbols=args.n_symbols)
    start = time.perf_counter()
    model, history = train(args, len(tokenizer))
    train_seconds = time.perf_counter() - start
    mechanism = measure(model, tokenizer, args)
    mechanism |= {
        "seed": args.seed,
        "train_steps": args.steps,
        "n_symbols": args.n_symbols,
        "train": {
            "batch": args.batch,
            "lr": args.lr,
            "half_len_range": [args.min_len, args.max_len],
            "max_prefix": args.max_prefix,
            "seconds": round(train_seconds, 1),
            "threads": args.threads,
            "history_step_loss_acc": history,
            "torch": torch.__version__,
        },
    }
    summary = {k: v for k, v in mechanism.items() if k not in ("scores", "train")}
    print(json.dumps(summary))
    print(json.dumps(mechanism["scores"]))
    print(f"trained {args.steps} steps in {train_seconds:.1f}s")
    scores = mechanism["scores"]
    clear = (
        mechanism["second_half_accuracy"] > 0.9
        and scores["induction_top"] - scores["induction_runner_up"] >= args.min_margin
    )
    if not clear and not args.force:
        print("no single clear induction head: not writing; try another --seed", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    save_state_dict(model, args.out / "model.safetensors")
    model.config.save_pretrained(args.out)
    tokenizer.backend_tokenizer.save(str(args.out / "tokenizer.json"))
    (args.out / "mechanism.json").write_text(json.dumps(mechanism, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
