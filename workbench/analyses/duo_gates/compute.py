"""DuoAttention gates (Xiao et al. 2024, mit-han-lab/duo-attention), one per KV head.

Streaming attention with sink ``s`` and window ``w`` lets the query at position ``q`` see the
keys ``K_s(q) = {k : k < s} | {k : q - w < k <= q}`` (no compensation token), softmax
renormalised over them:

``z^stream_h[q] = sum_{k in K_s(q)} softmax_{K_s(q)}(S_h[q, :])_k V_{g(h)}[k]``,

``S_h`` the head's pre-softmax scores (``hook_attn_scores``, causal mask applied), ``g(h) = h //
(n_heads / n_kv_heads)`` its KV head. A gate ``alpha_g in [0, 1]`` per KV head mixes, for every
query head reading it (at ``hook_z``, every query position),

``z_h = alpha_g z^full_h + (1 - alpha_g) z^stream_h``.

With the model frozen, the gates (an ``nn.Parameter`` of shape ``[n_layers, n_kv_heads]``,
initialised at 1) are trained on needle samples: sequence ``x = context + answer[:-1]``, answer
positions ``A`` = its last ``len(answer)`` positions (those predicting the answer tokens), final
hidden state ``h_L`` = ``blocks.{L-1}.hook_resid_post``. Per step, over every sample ``i`` of
the ``n`` (full batch, one backward per sample),

``loss = (1/n) sum_i mean_{q in A_i} ||h_L(mixed)[q] - h_L(full)[q]||^2 / d_model
+ lambda mean_g alpha_g``

(``distill`` + ``l1``; the full-attention targets from one no-grad forward per sample), then an
Adam step on the gates and ``alpha <- clamp(alpha, 0, 1)``. As the authors' training code (AdamW
without weight decay, i.e. Adam): the learning rate is ``lr`` times
``min(1, max((t + 1) / m, 0.1), max((T - t) / m, 0.1))`` at step ``t`` of ``T``, ``m = max(1,
T // 5)`` (linear warm-up over the first fifth, decay over the last, floor 0.1), so the first
step does not move every gate by the full ``lr`` at once (Adam's first step is ``lr`` per
coordinate whatever the gradient). Against that code: it distils the hidden states after the
final norm at the positions of the question and passkey tokens themselves; here the residual
stream before the final norm at the positions predicting the answer.

Table ``training`` row ``step = t`` holds the loss of the gates after ``t`` updates (row 0:
every gate 1, distill 0; the last row, ``t = steps``, from one more no-grad pass) and the
seconds since training began. The gradient reaches the gates only: the model's parameters have
``requires_grad=False``, and ``z^stream`` keeps its dependence on the earlier layers' gates
through ``S`` and ``V``.

Layers the model already slides natively (Gemma 3's local layers,
:func:`workbench.forward.streaming.native_windows`) get no gate: NaN in the output, never trained.
Outputs: per query head ``duo_gate`` (its KV head's gate), and table ``kv_heads`` (layer,
kv_head, metric ``duo_gate``, max, mean, sum: each the gate) so
``workbench.circuits.kvplans.kv_scores(table, "duo_gate", grid)`` reads it and
``build_plan(..., rule="quantile")`` thresholds it. Deterministic given the samples and
parameters (full-batch training draws nothing random; ``seed`` seeds a forked RNG).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from workbench.analyses.duo_gates import DuoGateParams
from workbench.circuits.kvplans import head_rows, pool_kv_heads
from workbench.errors import WorkbenchError
from workbench.forward.streaming import native_windows
from workbench.hooks import hook_name, hooked, kv_group
from workbench.progress import steps
from workbench.types import AnalysisOutput, HeadMetric, NeedleSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

METRIC = "duo_gate"


def stream_keep(seq_len: int, sink: int, window: int, device: Any = None) -> Bool[Tensor, "q k"]:
    """``keep[q, k]``: key ``k`` is in ``K_s(q)`` (module docstring), never a future key."""
    pos = torch.arange(seq_len, device=device)
    q, k = pos[:, None], pos[None, :]
    return (k <= q) & ((k < sink) | (k > q - window))


def gated_layers(model: LoadedModel) -> list[int]:
    """The layers that get a gate: all but those the model slides natively; refuses a model
    whose gated layers soft-cap their attention logits (the scores hook would not see what the
    softmax reads)."""
    native = native_windows(model)
    layers = [layer for layer in range(model.n_layers) if layer not in native]
    if not layers:
        raise WorkbenchError(
            f"duo_gates: every layer of {model.name} already slides natively; nothing to gate",
            "use a model with full-attention layers",
        )
    for layer in layers:
        attn = model.bridge.blocks[layer].attn.original_component
        if getattr(attn, "attn_logit_softcapping", None) is not None:
            raise WorkbenchError(
                f"duo_gates: layer {layer} soft-caps its attention logits; streaming is not "
                "exact there",
                "use a model without attention soft-capping",
            )
    return layers


@dataclass
class _LayerState:
    v: Tensor | None = None  # [b, k, n_kv_heads, d]
    pattern: Tensor | None = None  # [b, h, q, k], the streaming pattern (float32)


def duo_hooks(
    model: LoadedModel,
    gates: Float[Tensor, "layer kv_head"],
    sink: int,
    window: int,
    layers: Sequence[int] | None = None,
) -> list[tuple[str, Any]]:
    """The hooks mixing ``z = alpha z^full + (1 - alpha) z^stream`` at ``layers`` (default:
    :func:`gated_layers`) with ``alpha = gates[layer, kv_head]`` for each query head (module
    docstring); differentiable in ``gates``."""
    layers = gated_layers(model) if layers is None else list(layers)
    group = kv_group(model.n_heads, model.n_kv_heads)
    masks: dict[tuple[int, str], Tensor] = {}

    def keep_of(n: int, device: Any) -> Tensor:
        key = (n, str(device))
        if key not in masks:
            masks[key] = stream_keep(n, sink, window, device)
        return masks[key]

    def v_hook(st: _LayerState) -> Any:
        def hook(v: Tensor, hook: Any) -> None:
            st.v = v

        return hook

    def scores_hook(st: _LayerState, layer: int) -> Any:
        def hook(s: Tensor, hook: Any) -> None:
            n_q, n_k = int(s.shape[-2]), int(s.shape[-1])
            if n_q != n_k:
                raise WorkbenchError(
                    f"duo_gates: layer {layer} saw {n_q} queries over {n_k} keys (a KV cache?)",
                    "run whole sequences, without a cache",
                )
            keep = keep_of(n_q, s.device)
            kept = s.float().masked_fill(~keep, torch.finfo(torch.float32).min)
            st.pattern = torch.softmax(kept, dim=-1)

        return hook

    def z_hook(st: _LayerState, layer: int) -> Any:
        def hook(z: Tensor, hook: Any) -> Tensor:
            if st.v is None or st.pattern is None:
                raise WorkbenchError(
                    f"duo_gates: layer {layer}'s z came before its scores or values",
                    "use this workbench's pinned TransformerLens",
                )
            v = st.v.repeat_interleave(group, dim=2)  # [b, k, h, d]
            z_stream = torch.einsum("bhqk,bkhd->bqhd", st.pattern, v.float()).to(z.dtype)
            st.v = st.pattern = None
            alpha = gates[layer].repeat_interleave(group).to(z.dtype)[None, None, :, None]
            return alpha * z + (1 - alpha) * z_stream

        return hook

    hooks: list[tuple[str, Any]] = []
    for layer in layers:
        st = _LayerState()
        hooks += [
            (hook_name("v", layer), v_hook(st)),
            (hook_name("scores", layer), scores_hook(st, layer)),
            (hook_name("z", layer), z_hook(st, layer)),
        ]
    return hooks


@contextmanager
def duo_mix(
    model: LoadedModel,
    gates: Float[Tensor, "layer kv_head"],
    sink: int,
    window: int,
    layers: Sequence[int] | None = None,
) -> Iterator[Any]:
    """Every forward of ``model`` inside mixes full and streaming attention by ``gates``
    (:func:`duo_hooks`); the hooks are always removed."""
    with hooked(model.bridge, duo_hooks(model, gates, sink, window, layers)) as bridge:
        yield bridge


def final_hidden(
    model: LoadedModel,
    tokens: Int[Tensor, "b pos"],
    positions: slice,
    during: Sequence[tuple[str, Any]] = (),
) -> Float[Tensor, "b ans d_model"]:
    """``h_L`` (``blocks.{L-1}.hook_resid_post``) at ``positions`` of one forward of ``tokens``
    with the hooks ``during`` attached (gradients as the caller's mode allows)."""
    out: list[Tensor] = []

    def grab(x: Tensor, hook: Any) -> None:
        out.append(x[:, positions])

    hooks = [*during, (hook_name("resid_post", model.n_layers - 1), grab)]
    with hooked(model.bridge, hooks):
        model.bridge(tokens, prepend_bos=False, return_type=None)
    return out[0]


@dataclass
class _Sample:
    tokens: Tensor  # [1, pos]
    answer: slice
    target: Tensor  # [1, ans, d_model], full attention's h_L


def _samples(model: LoadedModel, prompts: NeedleSet) -> list[_Sample]:
    samples = getattr(prompts, "samples", None)
    if samples is None:
        raise WorkbenchError(
            f"duo_gates needs the 'needle' task, not '{getattr(prompts, 'task', '?')}'",
            "use task needle",
        )
    if not samples:
        raise WorkbenchError("duo_gates: the needle task gave no samples", "widen its grid")
    out = []
    for s in samples:
        n_ans = int(s.answer.shape[0])
        if n_ans < 1:
            raise WorkbenchError("duo_gates: a needle sample has an empty answer", "fix needles")
        seq = torch.cat([s.context, s.answer[:-1]]).to(model.device)[None]
        t = int(seq.shape[1])
        answer = slice(t - n_ans, t)
        with torch.no_grad():
            target = final_hidden(model, seq, answer).detach()
        out.append(_Sample(seq, answer, target))
    return out


def _distill(
    model: LoadedModel,
    gates: Tensor,
    sample: _Sample,
    params: DuoGateParams,
    layers: Sequence[int],
) -> Tensor:
    """``mean_{q in A} ||h_L(mixed)[q] - h_L(full)[q]||^2 / d_model`` of one sample."""
    mix = duo_hooks(model, gates, params.sink, params.window, layers)
    h = final_hidden(model, sample.tokens, sample.answer, mix)
    diff = h.float() - sample.target.float()
    return (diff**2).sum(-1).mean() / diff.shape[-1]


def lr_factor(step: int, total: int) -> float:
    """The authors' learning-rate multiplier at ``step`` of ``total`` (module docstring)."""
    m = max(1, total // 5)
    return min(1.0, max((step + 1) / m, 0.1), max((total - step) / m, 0.1))


def train_gates(
    model: LoadedModel, prompts: NeedleSet, params: DuoGateParams
) -> tuple[Float[np.ndarray, "layer kv_head"], pd.DataFrame, dict[str, Any]]:
    """The trained gates (NaN on natively sliding layers), the per-step training table and
    facts for ``info`` (module docstring)."""
    params.validate()
    layers = gated_layers(model)
    samples = _samples(model, prompts)
    n = len(samples)
    device = torch.device(model.device)
    gates = nn.Parameter(torch.ones(model.n_layers, model.n_kv_heads, device=device))
    trained = torch.tensor(layers, device=device)
    opt = torch.optim.Adam([gates], lr=params.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, params.steps))
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def row(step: int, distill: float) -> None:
        l1 = params.l1 * float(gates.detach()[trained].mean())
        rows.append(
            dict(step=step, loss=distill + l1, distill=distill, l1=l1,
                 seconds=time.perf_counter() - t0)
        )  # fmt: skip

    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
        torch.manual_seed(params.seed)
        for step in steps(range(params.steps), desc="duo gates"):
            opt.zero_grad(set_to_none=True)
            distill = 0.0
            for sample in samples:
                d = _distill(model, gates, sample, params, layers) / n
                d.backward()
                distill += float(d.detach())
            (params.l1 * gates[trained].mean()).backward()
            row(step, distill)
            opt.step()
            sched.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
        with torch.no_grad():
            final = sum(float(_distill(model, gates, s, params, layers)) for s in samples) / n
        row(params.steps, final)

    out = gates.detach().double().cpu().numpy().copy()
    native = [layer for layer in range(model.n_layers) if layer not in layers]
    out[native] = np.nan
    total = kept = 0
    for s in samples:
        t = int(s.tokens.shape[1])
        keep = stream_keep(t, params.sink, params.window)
        total += t * (t + 1) // 2
        kept += int(keep.sum())
    info = {
        "gated_layers": layers,
        "native_layers": native,
        "dropped_fraction": 1.0 - kept / total,
        "answer_positions": sum(s.answer.stop - s.answer.start for s in samples),
    }
    return out, pd.DataFrame(rows), info


def duo_gates(model: LoadedModel, prompts: NeedleSet, params: DuoGateParams) -> AnalysisOutput:
    """DuoAttention gates per KV head and per query head (module docstring)."""
    gates, training, facts = train_gates(model, prompts, params)
    group = kv_group(model.n_heads, model.n_kv_heads)
    per_head = np.repeat(gates, group, axis=1)  # query head h reads KV head h // group
    return AnalysisOutput(
        head_metrics={METRIC: HeadMetric(per_head, np.zeros_like(per_head), 1)},
        tables={
            "kv_heads": pool_kv_heads(head_rows({METRIC: gates}), model.n_kv_heads, "kv_head"),
            "training": training,
        },
        info={
            "final_loss": float(training["loss"].iloc[-1]),
            "initial_loss": float(training["loss"].iloc[0]),
            "final_distill": float(training["distill"].iloc[-1]),
            "steps": params.steps,
            "n_samples": len(prompts.samples),
            "sink": params.sink,
            "window": params.window,
            "l1": params.l1,
            "lr": params.lr,
            "optimizer": "adam, the paper's warm-up / decay schedule, gates clamped to [0, 1] "
            "after each step",
            "hidden": hook_name("resid_post", model.n_layers - 1),
            "query_heads_per_kv_head": group,
            **facts,
        },
    )
