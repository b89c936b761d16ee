"""Path patching to the logits, fast and exact: senders batched, resumed at their own layer.

With the logits as the only receiver, step 3 of path patching (:mod:`path_patching`) patches the
final residual stream to its step-2 value, so its logits *are* step 2's: one forward per sender,
not two. Step 2 runs the base input with the sender's ``z`` from the source run and every other
head's ``z`` frozen to the base run (MLPs recomputed unless ``freeze_mlps``). Before the
sender's layer nothing differs from the base run, so that forward is the activation-patching
sweep's: resume from the base run's ``resid_pre`` at the sender's layer, only positions from the
first clean/corrupt difference recomputed, senders of many layers in one batch
(:meth:`ResumableRun.run_wave`), the last block for the final query only. The freezing hooks
write the base run's ``z`` (and ``mlp_out``) for the recomputed positions of every row, with the
source ``z`` of the sender head in the rows of the senders that enter at that layer.

Equal to the two-pass implementation (:func:`path_patching.path_patch_sender`) on the tiny
models and on SmolLM2 (``tests/test_path_patching.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from jaxtyping import Float
from torch import Tensor

from workbench.forward.components import Index, first_diff_position
from workbench.forward.resume import ResumableRun, run_fallbacks, waves
from workbench.hooks import hook_name, hooked
from workbench.progress import steps
from workbench.types import Head, PromptSet

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def _freeze(base: Tensor, n: int, patch: Sequence[int] = (), source: Tensor | None = None) -> Any:
    """Hook: every row's activation := the base run's (last ``P`` positions, tiled); the last
    ``len(patch) * n`` rows (the senders entering here) take head ``patch[v]`` from ``source``."""

    def fn(act: Tensor, hook: Any) -> Tensor:
        p, reps = int(act.shape[1]), int(act.shape[0]) // n
        out = base[:, -p:].repeat(reps, *([1] * (base.ndim - 1))).to(act.dtype)
        if patch and source is not None:
            first = int(act.shape[0]) - len(patch) * n
            for v, head in enumerate(patch):
                rows = slice(first + v * n, first + (v + 1) * n)
                out[rows, :, head] = source[:, -p:, head]
        return out

    return fn


def base_runs(
    model: LoadedModel, prompts: PromptSet, *, freeze_mlps: bool = False
) -> tuple[ResumableRun, ResumableRun]:
    """The clean and corrupted runs the sweep resumes from (``z``, and ``mlp_out`` when MLPs are
    frozen, cached); their ``final_logits`` are the baselines."""
    kinds = ["z", "mlp_out"] if freeze_mlps else ["z"]
    return ResumableRun(model, prompts.clean, kinds), ResumableRun(model, prompts.corrupt, kinds)


def logits_receiver_sweep(
    base: ResumableRun,
    source: ResumableRun,
    senders: Sequence[Head],
    *,
    freeze_mlps: bool = False,
    batch_tokens: int = 2048,
) -> tuple[dict[Head, Float[Tensor, "batch vocab"]], dict[str, str]]:
    """Final-position logits of step 2 (= step 3) for every sender (module docstring), and
    the slower exact paths it fell back to; ``base`` and ``source`` come from
    :func:`base_runs`."""
    model = base.model
    n, seq_len, n_layers = base.n, base.seq_len, model.n_layers
    start = first_diff_position(base.tokens, source.tokens)
    prefix = base.prefix_kv(start) if 0 < start < seq_len else None
    wanted = start
    if prefix is None:
        start = 0
    by_layer: dict[int, list[Index]] = {}
    for s in senders:
        by_layer.setdefault(s.layer, []).append(Index(s.head, -1))
    per_wave = max(1, batch_tokens // (n * (seq_len - start)))
    out: dict[Head, Tensor] = {}
    for wave in steps(waves(by_layer, per_wave), desc="path patching senders"):
        entering: dict[int, list[int]] = {}
        for layer, ix in wave:
            entering.setdefault(layer, []).append(ix.head)
        entries = {
            layer: base.resid(layer)[:, start:].repeat(len(heads), 1, 1)
            for layer, heads in entering.items()
        }
        hooks: list[tuple[str, Callable[..., Any]]] = []
        for layer in range(min(entering), n_layers):
            z = hook_name("z", layer)
            hooks.append((z, _freeze(base.acts[z], n, entering.get(layer, ()), source.acts[z])))
            if freeze_mlps:
                mlp = hook_name("mlp_out", layer)
                hooks.append((mlp, _freeze(base.acts[mlp], n)))
        with hooked(model.bridge, hooks):
            logits = base.run_wave(entries, start=start, prefix=prefix, last_query_only=True)
        for j, (layer, ix) in enumerate(wave):
            out[Head(layer, ix.head)] = logits[j * n : (j + 1) * n]
    return out, run_fallbacks(base, wanted, start)
