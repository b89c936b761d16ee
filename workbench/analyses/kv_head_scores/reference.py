"""The slow, obvious reference of ``compute.py``: full patterns, a plain loop over heads,
queries and keys, straight from the module docstring's definitions (float64)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from workbench.hooks import every_layer, record

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.types import PromptSet


def reference_scores(model: LoadedModel, prompts: PromptSet) -> dict[str, np.ndarray]:
    """``{"echo", "induction"}``: ``[n_layers, n_heads]`` means over sequences."""
    length, repeats = int(prompts.meta["length"]), int(prompts.meta["repeats"])
    b = int(prompts.meta["offset"])
    out = {k: np.zeros((prompts.n, model.n_layers, model.n_heads)) for k in ("echo", "induction")}
    for s in range(prompts.n):
        rec = record(
            model.bridge,
            prompts.clean[s : s + 1],
            every_layer(["pattern"], model.n_layers),
            keep=lambda x: x[0].detach().double().cpu().numpy(),
        )
        for (_, layer), pattern in rec.acts.items():
            for h in range(model.n_heads):
                echo, ind, n_q = 0.0, 0.0, 0
                for r in range(1, repeats):
                    for i in range(length):
                        q = b + r * length + i
                        n_q += 1
                        for r2 in range(r):
                            k = b + r2 * length + i
                            echo += pattern[h, q, k]
                            ind += pattern[h, q, k + 1]
                out["echo"][s, layer, h] = echo / n_q
                out["induction"][s, layer, h] = ind / n_q
    return {k: v.mean(axis=0) for k, v in out.items()}
