"""RazorAttention's echo and induction scores (Tang et al. 2024), per head and per KV head.

On a sequence ``[BOS?] x_1..x_L`` repeated ``R`` times (task ``repeated``), position
``p(r, i) = b + r L + i`` (``b`` = 1 with BOS) holds ``x_{i+1}`` in repeat ``r``. For a query
``q = p(r, i)`` in a later repeat (``r >= 1``):

- echo keys ``E(q) = {p(r', i) : r' < r}`` (the same token in an earlier repeat);
- induction keys ``I(q) = {p(r', i) + 1 : r' < r}`` (the token right after it).

A head's score is the mean over those queries (and sequences) of its attention on the keys:
``echo_h = mean_q sum_{k in E(q)} A_h[q, k]``, likewise ``induction_h`` with ``I(q)``. With
grouped-query attention a KV head ``g`` is scored ``max`` over its query heads (the paper's
rule; ``mean`` is kept too): table ``kv_heads`` (layer, kv_head, metric, max, mean).
Patterns are reduced inside the hook (no ``T x T`` map is kept per layer). ``info`` also gives
the Spearman correlation of the induction score with the head detectors' induction score
(``head_detectors``: attention on the same induction keys, averaged over *all* queries) on the
same patterns: the two definitions differ in which queries they average over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from workbench.analyses.kv_head_scores import KVHeadScoreParams
from workbench.circuits.kvplans import head_rows, pool_kv_heads
from workbench.errors import WorkbenchError
from workbench.forward.patterns import detection_patterns
from workbench.forward.streaming import native_windows
from workbench.hooks import every_layer, kv_group, record
from workbench.progress import steps
from workbench.stats import mean_stderr, spearman
from workbench.types import AnalysisOutput, HeadMetric, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def razor_masks(
    length: int, repeats: int, offset: int, device: Any = None
) -> tuple[Bool[Tensor, "q k"], Bool[Tensor, "q k"], Bool[Tensor, " q"]]:
    """``(echo, induction, scored)``: the key masks ``E``, ``I`` and the scored queries (module
    docstring) for ``T = offset + length * repeats`` positions."""
    t = offset + length * repeats
    pos = torch.arange(t, device=device)
    r = torch.where(pos >= offset, (pos - offset) // length, -1)
    i = torch.where(pos >= offset, (pos - offset) % length, -1)
    same_i = (i[:, None] == i[None, :]) & (i[:, None] >= 0)
    earlier = (r[None, :] < r[:, None]) & (r[None, :] >= 0)
    echo = same_i & earlier
    induction = torch.zeros_like(echo)
    induction[:, 1:] = echo[:, :-1]  # key k + 1 for every echo key k
    return echo, induction, r >= 1


def kv_head_scores(
    model: LoadedModel, prompts: PromptSet, params: KVHeadScoreParams
) -> AnalysisOutput:
    """Echo and induction per head (module docstring); mean and stderr over sequences."""
    meta = prompts.meta
    if prompts.task != "repeated" or "repeats" not in meta:
        raise WorkbenchError(
            f"kv_head_scores needs the 'repeated' task, not '{prompts.task}'", "use task repeated"
        )
    tokens = prompts.clean
    echo_m, ind_m, scored = razor_masks(
        int(meta["length"]), int(meta["repeats"]), int(meta["offset"]), tokens.device
    )
    n_q = int(scored.sum())
    echo_rows, ind_rows = echo_m[scored].double(), ind_m[scored].double()
    per_seq = {k: np.zeros((prompts.n, model.n_layers, model.n_heads)) for k in ("echo", "ind")}
    detector = np.zeros((prompts.n, model.n_layers, model.n_heads))

    for start in steps(range(0, prompts.n, params.batch_size), desc="kv head scores"):
        batch = tokens[start : start + params.batch_size]
        det = detection_patterns(batch, "induction").double()

        def reduce(pattern: Float[Tensor, "b h q k"], det: Tensor = det) -> Any:
            p = pattern.detach().double()
            rows = p[:, :, scored]
            echo = (rows * echo_rows).sum((-1, -2)) / n_q
            ind = (rows * ind_rows).sum((-1, -2)) / n_q
            tl = (p * det[:, None]).sum((-1, -2)) / p.shape[-1]
            return echo.cpu(), ind.cpu(), tl.cpu()

        rec = record(model.bridge, batch, every_layer(["pattern"], model.n_layers), keep=reduce)
        stop = start + batch.shape[0]
        for (_, layer), (echo, ind, tl) in rec.acts.items():
            per_seq["echo"][start:stop, layer] = echo.numpy()
            per_seq["ind"][start:stop, layer] = ind.numpy()
            detector[start:stop, layer] = tl.numpy()

    n = prompts.n
    metrics = {
        "echo": HeadMetric(*mean_stderr(per_seq["echo"]), n),
        "induction": HeadMetric(*mean_stderr(per_seq["ind"]), n),
    }
    group = kv_group(model.n_heads, model.n_kv_heads)
    means = head_rows({k: m.mean for k, m in metrics.items()})
    pooled = pool_kv_heads(means, model.n_kv_heads, n_heads=model.n_heads)
    rho, _ = spearman(np.asarray(metrics["induction"].mean).ravel(), detector.mean(axis=0).ravel())
    return AnalysisOutput(
        head_metrics=metrics,
        tables={"kv_heads": pooled},
        info={
            "n_sequences": n,
            "length": int(meta["length"]),
            "repeats": int(meta["repeats"]),
            "scored_queries": n_q,
            "query_heads_per_kv_head": group,
            "spearman_induction_vs_head_detectors": rho,
            "native_windows": {str(k): v for k, v in native_windows(model).items()},
        },
    )
