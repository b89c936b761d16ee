"""TransformerLens 4.3's edge attribution under this graph's edge names: the peer the EAP
tests and the benchmark compare with, on the same inputs.

TL's ``attribution_patch(model, clean, corrupt, metric, EdgeAttributionConfig(granularity=
"edge"))`` takes its gradient on its "corrupt" run times its ``clean - corrupt``, per position.
Called with the roles swapped, that is our clean-run gradient times our ``corrupt - clean``;
summed over positions and averaged over prompts it is :func:`~workbench.edges.eap.eap_scores`'s
sign convention. TL runs one prompt pair per call (the metric sees one example's logits) and
refuses grouped-query attention at edge granularity, so this works on MHA models only.
"""

from __future__ import annotations

import time
from typing import Any


def _tl_name(node: Any) -> str:
    """Our name of a TL node (its position dropped)."""
    kind, la, h = node.kind, node.layer, node.head
    return {
        "embed": "embed",
        "attn_head_out": f"L{la}H{h}",
        "mlp_out": f"L{la}.mlp",
        "q_input": f"L{la}H{h}.q",
        "k_input": f"L{la}KV{h}.k",
        "v_input": f"L{la}KV{h}.v",
        "mlp_in": f"L{la}.mlp",
        "logits": "logits",
    }[kind]


def tl_edge_scores(model: Any, ps: Any) -> tuple[dict[str, float], list[float], int]:
    """TL's edge scores of ``ps`` (module docstring) by our edge names, each prompt's wall time,
    and the number of position-resolved edges TL scored per prompt. TL's cache needs a graph
    through the parameters, so they require grad during the calls (restored after)."""
    from transformer_lens.tools.analysis.attribution_patching import (
        EdgeAttributionConfig,
        attribution_patch,
    )

    params = list(model.bridge.parameters())
    for p in params:
        p.requires_grad_(True)
    out: dict[str, float] = {}
    times: list[float] = []
    n_edges = 0
    try:
        for i in range(ps.n):
            c, w = int(ps.correct[i]), int(ps.incorrect[i])

            def metric(logits: Any, c: int = c, w: int = w) -> Any:
                return logits[0, -1, c] - logits[0, -1, w]

            t = time.perf_counter()
            res = attribution_patch(
                model.bridge,
                ps.corrupt[i : i + 1],
                ps.clean[i : i + 1],
                metric,
                EdgeAttributionConfig(granularity="edge"),
            )
            times.append(time.perf_counter() - t)
            n_edges = len(res.edge_scores)
            for (writer, reader), s in res.edge_scores.items():
                key = f"{_tl_name(writer)}->{_tl_name(reader)}"
                out[key] = out.get(key, 0.0) + s / ps.n
            del res
    finally:
        for p in params:
            p.requires_grad_(False)
    return out, times, n_edges
