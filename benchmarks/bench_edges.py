"""Edge attribution: EAP against TransformerLens's edge attribution, and EAP / EAP-IG on SmolLM2.

Two parts, both in the default run (``--only-tl`` / ``--only-smollm2`` select one):

1. **Against TransformerLens** (``--only-tl``). TL 4.3's edge attribution
   (``attribution_patch(..., EdgeAttributionConfig(granularity="edge"))``) refuses grouped-query
   attention, so both sides run on a model of SmolLM2-135M's shapes with multi-head attention:
   ``LlamaForCausalLM`` built from SmolLM2's own HF config (layers, widths, vocabulary, RoPE
   theta, RMS eps, tied embeddings, read from the converted-weights folder) with
   ``num_key_value_heads = num_attention_heads``, random weights (seed ``--seed``), fp32, booted
   as a ``TransformerBridge`` like the tests' ``mha_llama``. Only SmolLM2's config and tokenizer
   are read, not its weights, so the IOI prompts are SmolLM2's tokens. ``--tl-layers`` keeps
   only the first layers (for development; the default is all of them).

   Same process, same thread count, one after the other: ours (``eap_scores``, batches of
   ``--batch-size`` prompts, after an untimed one-prompt warm-up) on the first ``--tl-prompts``
   prompts (default: all ``--n-prompts``) and, when that is fewer, also on all of them; then
   TL on the first ``--tl-prompts``, one ``attribution_patch`` call per prompt (its metric reads
   a single example's logits, so each prompt needs its own metric; TL itself loops over
   prompts one at a time anyway). Printed: wall times, per-prompt times, the ratio TL / ours
   on the same prompts and, when ours also ran on more, TL's per-prompt time over ours per
   prompt on all of them. TL's scores are mapped onto our edge names (clean and corrupt
   swapped, summed over positions, mean over prompts, as ``tests/edges/test_edges.py`` does) and
   compared edge for edge with ours on the same prompts: the largest absolute difference
   relative to the largest ``|score|``. The script exits non-zero if the edge sets differ or
   that figure exceeds 1e-4.

2. **SmolLM2-135M** (``--only-smollm2``): the real (GQA) model and IOI prompts: graph size,
   EAP and EAP-IG (``--steps``, default 5) wall times (after an untimed one-prompt warm-up),
   top edges, and exact patching of the ``--exact-top`` top EAP and EAP-IG edges.

Peak memory (unless ``--no-memory``) of each edge score computation (ours at ``--batch-size``
and at batch 1, TL, SmolLM2's EAP and EAP-IG): it runs once more in a fresh subprocess (this
script with a hidden flag) that loads or builds the same model and prompts, resets the
kernel's resident-set high-water mark (``/proc/self/clear_refs``), runs that computation alone
and reports its high-water mark (``VmHWM``) minus its resident set just before (``VmRSS``):
the extra resident memory the computation needed on top of the loaded model and prompts, with
no earlier step's peak or allocator leftovers hiding it. Where ``clear_refs`` cannot be written
it falls back to the process's ``ru_maxrss`` (which includes the load) and says so. The
children's times are printed too but include first-call costs.

Usage: ``.venv/bin/python benchmarks/bench_edges.py [--n-prompts 16] [--steps 5]
[--exact-top 10] [--threads T] [--batch-size 16] [--tl-prompts K] [--tl-layers L] [--seed 0]
[--no-memory] [--only-tl | --only-smollm2]``. On a machine shared with other jobs, 1 thread
can be several times faster than 2 (the threads of each parallel op wait for each other).
TL at full size is slow (it scores every position's edges separately, in Python), and the
memory children run it a second time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from workbench.edges.peer import tl_edge_scores

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m"
TOLERANCE = 1e-4


# ---------------------------------------------------------------- memory


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Extra resident memory of a block: the high-water mark (reset at entry) minus the
    resident set at entry. ``exact`` is False when the mark could not be reset; ``extra`` is
    then measured against the process's ``ru_maxrss``, which may predate the block."""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.before = _status_mib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = _status_mib("VmHWM") if self.exact else _maxrss_mib()
        self.extra = self.peak - self.before


# ---------------------------------------------------------------- the MHA model


def _smollm2_folder() -> Path:
    """SmolLM2's converted-weights folder (config, tokenizer); converted once if missing."""
    from workbench.models.known import fingerprint, get_entry
    from workbench.models.loading import converted_dir

    folder = converted_dir(get_entry(SMOLLM2), fingerprint(SMOLLM2))
    if not (folder / "config.json").exists():
        from workbench.models.loading import load_model

        load_model(SMOLLM2)  # converts the GGUF and writes the folder
        gc.collect()
    return folder


def mha_smollm2(seed: int, n_layers: int | None = None) -> Any:
    """A ``LoadedModel`` of SmolLM2-135M's shapes with as many KV heads as query heads, random
    weights (``seed``), fp32, SmolLM2's tokenizer; ``n_layers`` keeps only the first layers."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from workbench.models.boot import boot_bridge, quiet
    from workbench.models.codec import TextCodec, default_prepend_bos
    from workbench.models.known import get_entry
    from workbench.models.loading import LoadedModel

    folder = _smollm2_folder()
    entry = get_entry(SMOLLM2)
    with quiet():
        config = AutoConfig.from_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
    config.num_key_value_heads = config.num_attention_heads
    if n_layers is not None:
        config.num_hidden_layers = n_layers
    config._attn_implementation = "eager"
    t = time.perf_counter()
    torch.manual_seed(seed)
    with quiet():
        hf: Any = LlamaForCausalLM(config)
    hf = hf.to(torch.float32).eval()
    bridge = boot_bridge(hf, tok, entry.hf_name, architectures=entry.architectures)
    n_ctx = int(getattr(bridge.cfg, "n_ctx", 0) or 0) or 2048
    name = f"{SMOLLM2}-mha-random"
    codec = TextCodec(tok, prepend_bos=default_prepend_bos(tok), n_ctx=n_ctx, model_name=name)
    model = LoadedModel(
        name, entry, bridge, tok, codec, f"random-seed{seed}", time.perf_counter() - t,
        extra={"hf_config": config},
    )  # fmt: skip
    assert model.n_kv_heads == model.n_heads, (model.n_kv_heads, model.n_heads)
    return model


def _config_line(model: Any) -> str:
    c = model.extra["hf_config"]
    rope: dict[str, Any] = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    return (
        f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
        f"{c.num_key_value_heads} KV heads, hidden {c.hidden_size}, intermediate "
        f"{c.intermediate_size}, vocab {c.vocab_size}, rope theta "
        f"{rope['rope_theta']}, rms eps {c.rms_norm_eps:.3g}, tied embeddings "
        f"{c.tie_word_embeddings}"
    )


def _ioi(model: Any, n: int) -> Any:
    from workbench.tasks import build_task

    return build_task("ioi", model.codec, {"n_prompts": n})


def first(ps: Any, k: int) -> Any:
    """The first ``k`` prompts of a prompt set."""
    return dataclasses.replace(
        ps,
        clean=ps.clean[:k],
        corrupt=ps.corrupt[:k],
        correct=ps.correct[:k],
        incorrect=ps.incorrect[:k],
        prompts=ps.prompts[:k],
        corrupt_prompts=ps.corrupt_prompts[:k],
        meta={"first_of": ps.n},
    )


# ---------------------------------------------------------------- part 1: against TL


CHILDREN = ("ours", "tl", "eap", "eap-ig")
"""Memory children: ours / TL on the MHA model, EAP / EAP-IG on SmolLM2."""


def _memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: one edge score computation alone; prints JSON."""
    from workbench.edges import eap_ig_scores, eap_scores

    side = args.memory_child
    if side in ("eap", "eap-ig"):
        from workbench.models.loading import load_model

        model = load_model(SMOLLM2)
    else:
        model = mha_smollm2(args.seed, args.tl_layers)
    ps = _ioi(model, args.n_prompts)
    if side == "tl":
        ps = first(ps, args.tl_prompts or ps.n)
    t = time.perf_counter()
    with PeakMemory() as mem:
        if side == "tl":
            tl_edge_scores(model, ps)
        elif side == "eap-ig":
            eap_ig_scores(model, ps, steps=args.steps, batch_size=args.batch_size)
        else:
            eap_scores(model, ps, batch_size=args.batch_size)
    seconds = time.perf_counter() - t
    out = {"seconds": seconds, "n": ps.n, "extra_mib": mem.extra, "before_mib": mem.before,
           "peak_mib": mem.peak, "exact": mem.exact}  # fmt: skip
    print(json.dumps(out))


def memory(args: argparse.Namespace, side: str, label: str, batch_size: int | None = None) -> None:
    """Run one memory child and print its line."""
    batch = args.batch_size if batch_size is None else batch_size
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", side,
           "--n-prompts", str(args.n_prompts), "--tl-prompts", str(args.tl_prompts),
           "--seed", str(args.seed), "--threads", str(args.threads),
           "--steps", str(args.steps), "--batch-size", str(batch)]  # fmt: skip
    if args.tl_layers is not None:
        cmd += ["--tl-layers", str(args.tl_layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"memory child ({side}) failed, rc {proc.returncode}: " + " | ".join(tail))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    how = "" if out["exact"] else " (process ru_maxrss: high-water mark not resettable)"
    print(f"peak memory, {label} on {out['n']} prompts (fresh process): +{out['extra_mib']:.0f} "
          f"MiB over {out['before_mib']:.0f} MiB resident after load, peak "
          f"{out['peak_mib']:.0f} MiB{how}; {out['seconds']:.2f} s")  # fmt: skip


def against_tl(args: argparse.Namespace) -> None:
    import torch

    from workbench.edges import eap_scores, edge_graph

    print("== EAP vs TransformerLens 4.3 edge attribution (MHA model of SmolLM2's shapes) ==")
    model = mha_smollm2(args.seed, args.tl_layers)
    print(f"model: {_config_line(model)}; random weights (seed {args.seed}), fp32, "
          f"built in {model.load_seconds:.1f} s; threads {torch.get_num_threads()}; "
          f"resident {_status_mib('VmRSS'):.0f} MiB")  # fmt: skip
    counts = edge_graph(model).counts()
    print(f"edges: {counts}")
    ps = _ioi(model, args.n_prompts)
    k = min(args.tl_prompts or ps.n, ps.n)
    sub = first(ps, k)
    print(f"prompts: {ps}; TL runs on the first {k}")

    eap_scores(model, first(ps, 1))  # warm-up (first-call costs), not timed
    bs = min(args.batch_size, ps.n)
    t = time.perf_counter()
    ours_k = eap_scores(model, sub, batch_size=bs)
    ours_k_s = time.perf_counter() - t
    print(f"ours (eap_scores, batch {min(bs, k)}) on the {k} prompts: {ours_k_s:.2f} s, "
          f"{ours_k_s / k:.3f} s/prompt")  # fmt: skip
    ours_n_s = ours_k_s
    if k < ps.n:
        t = time.perf_counter()
        eap_scores(model, ps, batch_size=bs)
        ours_n_s = time.perf_counter() - t
        print(f"ours (eap_scores, batch {bs}) on all {ps.n} prompts: {ours_n_s:.2f} s, "
              f"{ours_n_s / ps.n:.3f} s/prompt")  # fmt: skip

    theirs, times, n_tl = tl_edge_scores(model, sub)
    tl_s = sum(times)
    print(f"TL attribution_patch on the {k} prompts (one call each): {tl_s:.2f} s, "
          f"{tl_s / k:.3f} s/prompt (first {times[0]:.2f} s, min {min(times):.2f} s, max "
          f"{max(times):.2f} s); {n_tl} position-resolved edges per prompt")  # fmt: skip
    print(f"ratio TL / ours, same {k} prompts: {tl_s / ours_k_s:.1f}x")
    if k < ps.n:
        print(f"ratio TL per prompt ({k} prompts) / ours per prompt (batch of {ps.n}): "
              f"{(tl_s / k) / (ours_n_s / ps.n):.1f}x")  # fmt: skip

    ours = ours_k.as_dict()
    if set(ours) != set(theirs):
        only_ours, only_tl = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise SystemExit(f"edge sets differ: {len(only_ours)} only ours (e.g. {only_ours[:3]}), "
                         f"{len(only_tl)} only TL (e.g. {only_tl[:3]})")  # fmt: skip
    largest = max(abs(v) for v in ours.values())
    diff = max(abs(theirs[e] - ours[e]) for e in ours)
    rel = diff / largest
    print(f"scores, {len(ours)} edges on the same {k} prompts: max |TL - ours| {diff:.3g}, "
          f"largest |score| {largest:.3g}, relative {rel:.2e} (limit {TOLERANCE:g})")  # fmt: skip
    if not rel <= TOLERANCE:
        raise SystemExit(f"EAP and TL edge scores differ: relative {rel:.2e} > {TOLERANCE:g}")
    del model, theirs, ours, ours_k
    gc.collect()

    if args.no_memory:
        return
    memory(args, "ours", f"ours (eap_scores, batch {bs})")
    if bs != 1:
        memory(args, "ours", "ours (eap_scores, batch 1)", batch_size=1)
    memory(args, "tl", "TL (one prompt at a time)")


# ---------------------------------------------------------------- part 2: SmolLM2


def smollm2(args: argparse.Namespace) -> None:
    import torch

    from workbench.edges import eap_ig_scores, eap_scores, edge_graph, exact_edge_patching
    from workbench.models.loading import load_model

    print("== SmolLM2-135M (GQA): EAP, EAP-IG, exact edge patching ==")
    t = time.perf_counter()
    model = load_model(SMOLLM2)
    print(f"model: {model} ({time.perf_counter() - t:.1f} s), threads {torch.get_num_threads()}")
    graph = edge_graph(model)
    print(f"edges: {graph.counts()}")
    ps = _ioi(model, args.n_prompts)
    print(f"prompts: {ps}")

    bs = min(args.batch_size, ps.n)
    eap_scores(model, first(ps, 1), batch_size=bs)  # warm-up (first-call costs), not timed
    t = time.perf_counter()
    res = eap_scores(model, ps, batch_size=bs)
    print(f"EAP (batch {bs}): {time.perf_counter() - t:.2f} s, info {res.info}")
    t = time.perf_counter()
    ig = eap_ig_scores(model, ps, steps=args.steps, batch_size=bs)
    print(f"EAP-IG m={args.steps} (batch {bs}): {time.perf_counter() - t:.2f} s")
    if not args.no_memory:
        memory(args, "eap", f"EAP (batch {bs})")
        memory(args, "eap-ig", f"EAP-IG m={args.steps} (batch {bs})")

    print("top 10 edges by |EAP| (EAP, EAP-IG):")
    ig_scores = ig.as_dict()
    for name, value in res.top(10):
        print(f"  {name:>18}  {value:+.4f}  {ig_scores[name]:+.4f}")
    print("top 10 edges by |EAP-IG|:")
    for name, value in ig.top(10):
        print(f"  {name:>18}  {value:+.4f}")

    if args.exact_top:
        chosen = [n for n, _ in res.top(args.exact_top)] + [n for n, _ in ig.top(args.exact_top)]
        chosen = list(dict.fromkeys(chosen))
        t = time.perf_counter()
        ex = exact_edge_patching(model, ps, chosen)
        took = time.perf_counter() - t
        print(
            f"exact patching of {len(chosen)} edges: {took:.2f} s, "
            f"{ex.info['forwards']:.2f} forward units, from position "
            f"{ex.info['first_recomputed_position']}"
        )
        exact = ex.as_dict()
        eap_d = res.as_dict()
        print(f"  {'edge':>18}  {'EAP':>8}  {'EAP-IG':>8}  {'exact':>8}")
        for name in chosen:
            print(f"  {name:>18}  {eap_d[name]:+.4f}  {ig_scores[name]:+.4f}  {exact[name]:+.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=16, help="IOI prompt pairs (default 16)")
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG steps m (default 5)")
    ap.add_argument("--exact-top", type=int, default=10,
                    help="exact patching of the top K EAP and EAP-IG edges (0: skip)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tl-prompts", type=int, default=0,
                    help="TL runs on the first K prompts (0: all)")  # fmt: skip
    ap.add_argument("--tl-layers", type=int, default=None,
                    help="only the first L layers of the MHA model (default: all)")  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=16,
                    help="our prompts per forward/backward (default 16)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="seed of the MHA model's random weights")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--only-tl", action="store_true", help="only the comparison against TL")
    only.add_argument("--only-smollm2", action="store_true", help="only the SmolLM2 part")
    ap.add_argument("--memory-child", choices=CHILDREN, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args)
        return
    if not args.only_smollm2:
        against_tl(args)
    if not args.only_tl:
        smollm2(args)


if __name__ == "__main__":
    main()
