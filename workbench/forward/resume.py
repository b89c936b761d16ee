"""The fast exact patching sweep: resume from the patched layer, many variants per batch.

For a patch at layer ``l`` of the base run (corrupted for denoising, clean for noising):

1. Every activation before layer ``l`` is unchanged, so the run resumes from the base run's
   cached residual ``resid_pre[l]``: blocks ``l .. L-1`` are called directly with the very
   arguments the model passed them in the base run (attention mask, rotary cos/sin, position
   ids, recorded per block by a pre-forward hook), so GQA, Gemma's sliding-window layers and
   their local/global rotary embeddings are reproduced exactly. (The bridge's own
   ``start_at_layer`` still runs blocks ``0 .. l-1`` and discards them, so it saves nothing.)
2. Patched variants of the ``n`` prompts share a batch, ``n`` rows each (variant-major), even
   across layers: a *wave* of variants starts at its lowest patched layer, and the variants
   patched at layer ``l`` join the batch right before block ``l`` with the base run's
   ``resid_pre[l]``; a hook at layer ``l`` writes ``where(mask[v], donor, act)`` into just
   those rows. One block call per layer per wave, instead of one per (layer, chunk).
3. Only the final position is unembedded: ``logits = unembed(ln_final(x[:, -1]))`` (with the
   final logit soft-cap where the model has one); for logit-difference metrics only the
   answer columns of ``W_U``. The last block itself runs for the final query only: the keys
   and values of the other recomputed positions come from a run of that block stopped at its
   cache update (:class:`CaptureKV`), so their scores, output projection and MLP are skipped.
4. A wave holds at most ``batch_tokens`` recomputed tokens (rows x positions), which bounds
   memory.
5. Patches that leave positions ``< f`` unchanged (``f`` = first position where clean and
   corrupted differ) recompute only positions ``f..``: the resumed blocks get the suffix of the
   residual, the suffix of the recorded mask / rotary tables, and a :class:`PrefixKV` in place of
   the HF cache that prepends the base run's keys and values of positions ``< f``. Where the
   model's cache cannot give them (e.g. a sliding-window cache cut shorter than the prompt) all
   positions are recomputed (still exact).

Cost (in forwards of the ``n`` prompts through all ``L`` layers): ``sum_patches (L - l) / L *
(T - f) / T`` (an upper bound: the last block's saving is not counted). Exactness against full
forwards: ``tests/test_patching.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.forward import fallbacks
from workbench.forward.components import Index, patch_mask
from workbench.hooks import hook_name, hooked
from workbench.models.compat import CACHE_KEYWORDS
from workbench.progress import steps

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

MetricFn = Callable[[Tensor], Tensor]


def _drop_caches(obj: Any) -> Any:
    """Replace HF KV-cache objects by None (the resumed blocks must not append to them)."""
    from transformers.cache_utils import Cache

    if isinstance(obj, Cache):
        return None
    if isinstance(obj, tuple):
        return tuple(_drop_caches(x) for x in obj)
    return obj


def _is_cache(obj: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(obj, Cache)


class PrefixKV:
    """Stands in for the HF cache in a resumed suffix-only run: ``update`` puts the base run's
    keys and values of positions ``< start`` (tiled to the batch) before the suffix's own."""

    def __init__(self, keys: dict[int, Tensor], values: dict[int, Tensor], reps: int) -> None:
        self.keys, self.values, self.reps = keys, values, reps

    def update(
        self, k: Tensor, v: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        pk = self.keys[layer_idx].repeat(self.reps, 1, 1, 1)
        pv = self.values[layer_idx].repeat(self.reps, 1, 1, 1)
        return torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)


def suffix(name: str, obj: Any, start: int, seq_len: int, stop: int | None = None) -> Any:
    """Slice a recorded block argument to query positions ``start..stop`` (keys ``..stop``)."""
    stop = seq_len if stop is None else stop
    if isinstance(obj, tuple):
        return tuple(suffix(name, x, start, seq_len, stop) for x in obj)
    if not isinstance(obj, Tensor):
        return obj
    if name in ("position_ids", "cache_position"):
        return obj[..., start:stop]
    if obj.ndim == 4 and obj.shape[-2:] == (seq_len, seq_len):  # attention mask
        return obj[..., start:stop, :stop]
    if name == "position_embeddings":  # (cos, sin): [batch, pos, rot]
        return obj[..., start:stop, :]
    raise ValueError(f"no suffix rule for block argument {name!r} {tuple(obj.shape)}")


class _Captured(Exception):
    """Raised by :class:`CaptureKV` to stop a block once its keys and values are known."""


class CaptureKV:
    """A cache whose ``update`` records the keys and values the attention computed (after
    rotary embeddings; behind the base run's prefix if ``prefix`` is given) and stops the block:
    nothing after it (scores, output projection, MLP) is computed."""

    def __init__(self, prefix: PrefixKV | None) -> None:
        self.prefix = prefix
        self.kv: tuple[Tensor, Tensor] | None = None

    def update(self, k: Tensor, v: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        if self.prefix is not None:
            k, v = self.prefix.update(k, v, layer_idx)
        self.kv = (k, v)
        raise _Captured


class FixedKV:
    """A cache that puts given keys and values before the new ones."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    def update(self, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)


def _tile(obj: Any, n: int, reps: int) -> Any:
    """Repeat per-row tensors (leading dim ``n``) ``reps`` times, variant-major."""
    if isinstance(obj, Tensor) and obj.ndim >= 1 and obj.shape[0] == n and reps > 1 and n > 1:
        return obj.repeat(reps, *([1] * (obj.ndim - 1)))
    if isinstance(obj, tuple):
        return tuple(_tile(x, n, reps) for x in obj)
    return obj


class ResumableRun:
    """One base run, cached so later runs can resume at any block with patched variants.

    ``resid[l]`` is the base run's ``resid_pre`` at layer ``l``; ``acts[l]`` the base run's
    activation of ``kind`` (if given); ``final_logits`` its final-position logits.
    """

    def __init__(
        self, model: LoadedModel, tokens: Int[Tensor, "batch pos"], kinds: Sequence[str] = ()
    ) -> None:
        self.model = model
        self.tokens = tokens
        self.n = int(tokens.shape[0])
        bridge = model.bridge
        self.seq_len = int(tokens.shape[1])
        self.block_args: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.hf_cache: Any = None
        names = [hook_name("resid_pre", layer) for layer in range(model.n_layers)]
        names += [hook_name(k, layer) for k in kinds for layer in range(model.n_layers)]
        names = list(dict.fromkeys(names))

        def record(layer: int) -> Callable[..., None]:
            def pre(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                found = [a for a in (*args, *kwargs.values()) if _is_cache(a)]
                if found:
                    self.hf_cache = found[0]
                rest = tuple(_drop_caches(a) for a in args[1:])
                kw = {k: _drop_caches(v) for k, v in kwargs.items() if k != "hidden_states"}
                if "use_cache" in kw:
                    kw["use_cache"] = False
                self.block_args[layer] = (rest, kw)

            return pre

        handles = [
            blk.register_forward_pre_hook(record(i), with_kwargs=True)
            for i, blk in enumerate(bridge.blocks)
        ]
        try:
            with torch.inference_mode():
                logits, cache = bridge.run_with_cache(  # unembed the final position only
                    tokens, prepend_bos=False, names_filter=lambda n: n in names, logits_to_keep=1
                )
        finally:
            for h in handles:
                h.remove()
        self.final_logits: Float[Tensor, "batch vocab"] = logits[:, -1].clone()
        self.acts: dict[str, Tensor] = {n: cache[n].clone() for n in names}
        cap = getattr(getattr(bridge, "_driver", None), "underlying_model", None)
        self.softcap = getattr(getattr(cap, "config", None), "final_logit_softcapping", None)
        self.last_query_ok = True

    def prefix_kv(self, start: int) -> tuple[dict[int, Tensor], dict[int, Tensor]] | None:
        """Keys and values of positions ``< start`` per layer from the base run's HF cache, or
        None where the suffix-only resume cannot be used (no cache, a truncated sliding-window
        cache, a block argument without a slicing rule)."""
        layers = getattr(self.hf_cache, "layers", None)
        if start <= 0 or layers is None or len(layers) != self.model.n_layers:
            return None
        keys, values = {}, {}
        for i, lay in enumerate(layers):
            k, v = getattr(lay, "keys", None), getattr(lay, "values", None)
            if not isinstance(k, Tensor) or not isinstance(v, Tensor):
                return None
            if k.ndim != 4 or k.shape[-2] != self.seq_len or v.shape[-2] != self.seq_len:
                return None
            keys[i], values[i] = k[:, :, :start].clone(), v[:, :, :start].clone()
        try:
            for rest, kw in self.block_args.values():
                for a in rest:
                    suffix("arg", a, start, self.seq_len)
                for name, a in kw.items():
                    suffix(name, a, start, self.seq_len)
        except ValueError:
            return None
        return keys, values

    def resid(self, layer: int) -> Tensor:
        return self.acts[hook_name("resid_pre", layer)]

    def act(self, kind: str, layer: int) -> Tensor:
        return self.acts[hook_name(kind, layer)]

    def unembed_last(
        self, x: Float[Tensor, "batch pos d_model"], columns: Tensor | None = None
    ) -> Float[Tensor, "batch cols"]:
        """Final norm and unembedding of the final position only (of ``columns`` only if
        given: ``h @ W_U[:, columns] + b_U[columns]``)."""
        bridge = self.model.bridge
        if columns is None:
            logits = bridge.unembed(bridge.ln_final(x[:, -1:]))[:, 0]
        else:
            h = bridge.ln_final(x[:, -1:])[:, 0]
            logits = h @ bridge.W_U[:, columns] + bridge.b_U[columns]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits  # type: ignore[no-any-return]

    def run_from(
        self,
        layer: int,
        resid: Float[Tensor, "rows pos d_model"],
        fwd_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
        start: int = 0,
        prefix: tuple[dict[int, Tensor], dict[int, Tensor]] | None = None,
    ) -> Float[Tensor, "rows vocab"]:
        """Blocks ``layer .. L-1`` on ``resid`` (``V * n`` rows), then final-position logits.

        With ``start > 0`` and ``prefix`` (from :meth:`prefix_kv`), only positions ``start..``
        are computed (``resid`` holds just those); attention reads the base run's keys and
        values for the earlier positions, which no patch at or after ``start`` can change.
        """
        with hooked(self.model.bridge, fwd_hooks):
            return self.run_wave({layer: resid}, start=start, prefix=prefix)

    def run_wave(
        self,
        entries: dict[int, Float[Tensor, "rows pos d_model"]],
        start: int = 0,
        prefix: tuple[dict[int, Tensor], dict[int, Tensor]] | None = None,
        columns: Tensor | None = None,
        last_query_only: bool = False,
    ) -> Float[Tensor, "rows cols"]:
        """Rows that join the batch at different layers: ``entries[l]`` (``V_l * n`` rows of
        residual, variant-major) is appended to the batch right before block ``l``; after the
        last block, the final-position logits of all rows in order of entry.

        Hooks set by the caller see the whole batch at each block; the rows that entered at
        block ``l`` are its last ``V_l * n`` rows there. ``last_query_only`` (no hook at the last
        block): that block computes the final query only (see :meth:`_last_block_last_query`).
        """
        layers = sorted(entries)
        x: Tensor | None = None
        last = self.model.n_layers - 1
        with torch.inference_mode():
            for i in range(layers[0], self.model.n_layers):
                if i in entries:
                    x = entries[i] if x is None else torch.cat([x, entries[i]])
                assert x is not None
                if i == last and last_query_only and x.shape[1] > 1 and self.last_query_ok:
                    x = self._last_block_last_query(x, start, prefix)
                    continue
                x = self._block(i, x, start, prefix, self._cache_for(x, prefix))
            assert x is not None
            return self.unembed_last(x, columns)

    def _cache_for(self, x: Tensor, prefix: Any) -> PrefixKV | None:
        if prefix is None:
            return None
        return PrefixKV(prefix[0], prefix[1], int(x.shape[0]) // self.n)

    def _block(
        self,
        i: int,
        x: Tensor,
        start: int,
        prefix: Any,
        cache: Any,
        stop: int | None = None,
    ) -> Tensor:
        """Block ``i`` on ``x`` (query positions ``start..stop`` of every row) with the recorded
        arguments sliced to those positions and ``cache`` where the model passes its cache."""
        reps = int(x.shape[0]) // self.n
        rest, kw = self.block_args[i]
        if prefix is not None or stop is not None:
            rest = tuple(suffix("arg", a, start, self.seq_len, stop) for a in rest)
            kw = {k: suffix(k, v, start, self.seq_len, stop) for k, v in kw.items()}
        if cache is not None:
            rest, kw = _with_cache(self.model, rest, kw, cache)
        rest = tuple(_tile(a, self.n, reps) for a in rest)
        kw = {k: _tile(v, self.n, reps) for k, v in kw.items()}
        out = self.model.bridge.blocks[i](x, *rest, **kw)
        return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]

    def _last_block_last_query(self, x: Tensor, start: int, prefix: Any) -> Tensor:
        """The last block for the final query only: its keys and values at the other recomputed
        positions come from a run of the block that stops at the cache update (no scores,
        output projection or MLP for them); the final position then attends to all keys.
        Falls back to the whole block (and stops trying) if the model never calls the cache."""
        i, t = self.model.n_layers - 1, self.seq_len
        capture = CaptureKV(self._cache_for(x, prefix))
        with contextlib.suppress(_Captured):
            self._block(i, x[:, :-1], start, prefix, capture, stop=t - 1)
        if capture.kv is None:
            self.last_query_ok = False
            return self._block(i, x, start, prefix, self._cache_for(x, prefix))
        return self._block(i, x[:, -1:], t - 1, prefix, FixedKV(*capture.kv), stop=t)


def _with_cache(
    model: LoadedModel, rest: tuple[Any, ...], kw: dict[str, Any], cache: PrefixKV
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Put ``cache`` where the model passed its own HF cache (a keyword or GPT-2's 2nd arg)."""
    for name in CACHE_KEYWORDS:
        if name in kw:
            return rest, {**kw, name: cache}
    if rest and rest[0] is None:
        return (cache, *rest[1:]), kw
    return rest, {**kw, "past_key_values": cache}


def _suffix_donor(component: str, act: Tensor, start: int) -> Tensor:
    return act[:, :, start:] if component == "pattern" else act[:, start:]


def _tail_patch(component: str, local: Sequence[Index], donor: Tensor) -> Callable[..., Tensor]:
    """Hook writing patch ``local[v]`` into the batch's last ``V * n`` rows (the variants that
    entered at this layer): ``where(mask[v], donor, act)``; earlier rows pass unchanged."""
    mask = patch_mask(component, local, donor.shape, donor.device)
    new = len(local) * int(donor.shape[0])

    def hook(act: Tensor, hook: Any) -> Tensor:
        tail = act[-new:].reshape(len(local), -1, *act.shape[1:])
        patched = torch.where(mask, donor[None], tail).reshape(new, *act.shape[1:])
        return patched if act.shape[0] == new else torch.cat([act[:-new], patched])

    return hook


def run_fallbacks(base: ResumableRun, wanted_start: int, start: int) -> dict[str, str]:
    """The slower exact paths a sweep fell back to (recorded in the run's info and printed
    once per model): all positions recomputed although only ``wanted_start..`` had to be, or
    the last block run whole."""
    out: dict[str, str] = {}
    if 0 < wanted_start < base.seq_len and start == 0:
        out["suffix_resume"] = (
            f"all positions recomputed, not only {wanted_start}.. (the base run's HF cache "
            "gave no usable keys and values, e.g. a sliding-window cache shorter than the prompt)"
        )
    if not base.last_query_ok:
        out["last_query"] = "the last block ran whole (the model never called the capture cache)"
    for what, text in out.items():
        fallbacks.note(base.model, what, text)
    return out


def waves(layer_indices: dict[int, list[Index]], per_wave: int) -> list[list[tuple[int, Index]]]:
    """All ``(layer, index)`` patches in layer order, cut into waves of ``per_wave`` variants."""
    flat = [(layer, ix) for layer in sorted(layer_indices) for ix in layer_indices[layer]]
    return [flat[i : i + per_wave] for i in range(0, len(flat), per_wave)]


def fast_sweep(
    base: ResumableRun,
    donor: ResumableRun,
    component: str,
    layer_indices: dict[int, list[Index]],
    metric: MetricFn,
    batch_tokens: int,
    start: int = 0,
    columns: Tensor | None = None,
) -> tuple[dict[tuple[int, Index], Tensor], float, int]:
    """Per-prompt metric of every patch; returns the values, the cost in forward units and
    the first recomputed position.

    ``start``: every patch leaves positions ``< start`` unchanged (they are identical in both
    runs, or not patched), so only positions ``start..`` are recomputed where the model's cache
    allows (see :meth:`ResumableRun.prefix_kv`); otherwise all positions are.

    Variants run in *waves* of at most ``batch_tokens`` (rows x recomputed positions) tokens:
    a wave enters at the smallest patched layer among its variants, and each variant's rows
    join the batch at its own layer (taking the base run's residual there), so variants of
    many layers share one batch per block. ``columns``: unembed only these vocabulary columns
    (the metric reads the answer logits only).
    """
    n, n_layers, seq_len = base.n, base.model.n_layers, base.seq_len
    prefix = base.prefix_kv(start) if 0 < start < seq_len else None
    if prefix is None:
        start = 0
    per_wave = max(1, batch_tokens // (n * (seq_len - start)))
    out: dict[tuple[int, Index], Tensor] = {}
    cost = 0.0
    for wave in steps(waves(layer_indices, per_wave), desc=f"patching {component}"):
        by_layer: dict[int, list[Index]] = {}
        for layer, ix in wave:
            by_layer.setdefault(layer, []).append(ix)
        entries: dict[int, Tensor] = {}
        hooks: list[tuple[str, Callable[..., Any]]] = []
        for layer, indices in by_layer.items():
            donor_act = _suffix_donor(component, donor.act(component, layer), start)
            local = [Index(ix.head, ix.pos - start if ix.pos >= 0 else -1) for ix in indices]
            resid = base.resid(layer)[:, start:]
            rows = resid.repeat(len(indices), *([1] * (resid.ndim - 1)))
            entries[layer] = rows
            hooks.append((hook_name(component, layer), _tail_patch(component, local, donor_act)))
        with hooked(base.model.bridge, hooks):
            logits = base.run_wave(
                entries,
                start=start,
                prefix=prefix,
                columns=columns,
                last_query_only=n_layers - 1 not in entries,
            )
        values = metric(logits).reshape(len(wave), n)
        for j, key in enumerate(wave):
            out[key] = values[j]
        cost += (
            sum((n_layers - layer) / n_layers for layer, _ in wave) * (seq_len - start) / seq_len
        )
    return out, cost, start
