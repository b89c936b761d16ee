"""Layer sharing: what every plan of one sample shares below its first streaming layer.

Let ``L(P)`` be the lowest layer with a streaming KV head in plan ``P`` (``n_layers - 1`` for
an all-full plan). Blocks ``0 .. L(P) - 1`` attend fully under ``P``, so their residual stream
and their keys and values equal full attention's at every position. One full-attention run of
the context (:class:`ContextRun`, the patching engine's
:class:`~workbench.forward.resume.ResumableRun`: ``resid_pre`` per layer,
each block's recorded arguments and the HF cache) is therefore shared: plan ``P`` resumes at
block ``L(P)`` from ``resid_pre[L(P)]`` at positions ``p..N-1`` (``p`` the shared prefix of
:func:`compute._prefix`), with a cache whose layers ``< L(P)`` are the full run's (all ``N``
positions, what later decoding reads there) and whose layers ``>= L(P)`` are the prefix's.
Only the requested positions are unembedded. Cost of a plan's context pass in forwards:
``(N - p) / N * (n_layers - L(P)) / n_layers``; the shared run costs one forward per sample,
so :func:`worth_it` uses it only when ``sum_P L(P) / n_layers > 1``.

Exactness (same metrics as the unshared path): ``tests/analyses/test_kv_plan_eval.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.forward.resume import ResumableRun, suffix
from workbench.forward.streaming import check_plan

if TYPE_CHECKING:
    from workbench.forward.plan import KVPlan
    from workbench.models.loading import LoadedModel
    from workbench.types import NeedleSample


def first_layer(model: LoadedModel, plan: KVPlan) -> int:
    """``L(P)``: the lowest layer with a streaming KV head (``n_layers - 1`` if none)."""
    stream = check_plan(model, plan)
    return min(stream) if stream else model.n_layers - 1


def worth_it(model: LoadedModel, plans: Iterable[KVPlan]) -> bool:
    """Whether one shared run per sample costs less than the layers it saves."""
    return sum(first_layer(model, p) for p in plans) > model.n_layers


def _plain(layer: Any) -> Any:
    """A copy of one HF cache layer whose tensors are ordinary (not inference-mode) tensors."""
    out = copy.copy(layer)
    for name in ("keys", "values"):
        t = getattr(layer, name, None)
        if isinstance(t, Tensor):
            setattr(out, name, t.clone())
    return out


class ContextRun:
    """Full attention's run of one sample's context, which every plan resumes from."""

    def __init__(self, model: LoadedModel, sample: NeedleSample) -> None:
        self.model = model
        self.run = ResumableRun(model, sample.context[None].to(model.device))
        self.n = self.run.seq_len
        layers = getattr(self.run.hf_cache, "layers", None)
        self.ok = layers is not None and len(layers) == model.n_layers
        try:  # every recorded block argument can be cut to a suffix of the positions
            for rest, kw in self.run.block_args.values():
                for a in rest:
                    suffix("arg", a, 1, self.n)
                for name, a in kw.items():
                    suffix(name, a, 1, self.n)
        except ValueError:
            self.ok = False

    def cache(self, layer: int, prefix: Any) -> Any:
        """A copy of ``prefix`` (the first ``p`` positions' cache) whose layers ``< layer``
        hold the full run's keys and values of all ``N`` positions."""
        out = copy.deepcopy(prefix)
        for i in range(layer):
            out.layers[i] = _plain(self.run.hf_cache.layers[i])
        return out

    @torch.no_grad()
    def resume(
        self, layer: int, start: int, cache: Any, keep: Int[Tensor, " k"]
    ) -> Float[Tensor, "k vocab"]:
        """Blocks ``layer ..`` on positions ``start .. N-1`` from the full run's residual
        (hooks in force apply, ``cache`` is updated), then logits at ``start + keep``."""
        run, bridge = self.run, self.model.bridge
        x = run.resid(layer)[:, start:].clone()
        for i in range(layer, self.model.n_layers):
            x = run._block(i, x, start, None, cache, stop=self.n)
        logits = bridge.unembed(bridge.ln_final(x[:, keep.to(x.device)]))[0]
        if run.softcap:
            logits = torch.tanh(logits / run.softcap) * run.softcap
        return logits.float()  # type: ignore[no-any-return]

    def cost(self, layer: int, start: int) -> float:
        """Tokens (in full-forward units) a resumed context pass costs."""
        return (self.n - start) * (self.model.n_layers - layer) / self.model.n_layers
