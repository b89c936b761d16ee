"""Running a KV-cache plan: streaming attention on chosen KV heads, masked or really evicted.

A :class:`~workbench.circuits.kvplans.KVPlan` keeps some KV heads ``full`` and lets the others
*stream*: a query at absolute position ``q`` keeps the keys ``k < sink`` and
``q - window < k <= q`` and drops

``D(q) = {k : sink <= k <= q - window, k visible to q under the model's own mask}``.

With compensation (RazorAttention, Tang et al. 2024) the dropped keys and values are replaced
by one virtual token: key ``k_c = mean_{k in D(q)} K_k`` (the cached, rotated keys) and value
``v_c = mean_{k in D(q)} V_k``, counted ``w = |D(q)|`` times (``weighted``, as the paper says)
or once. Its score is ``s_c = q . k_c * scale = mean_{k in D(q)} s_qk`` (the score is linear in
the key), so the head's output is

``z' = (sum_{k kept} e^{s_qk} V_k + w e^{s_c} v_c) / (sum_{k kept} e^{s_qk} + w e^{s_c})
     = sigmoid(a - b) z_kept + sigmoid(b - a) v_c``,

``a = logsumexp_{k kept} s_qk``, ``b = s_c + log w``, ``z_kept`` the attention over the kept
keys alone. With ``D(q)`` empty nothing changes.

Two modes (:class:`StreamAttention`):

- ``mask``: one ordinary forward (with or without a KV cache); per streaming head the dropped
  scores are set to the mask value at ``hook_attn_scores``; ``k_c`` and ``v_c`` are the means
  of the dropped rotated keys and values from prefix sums over the sequence's keys and values
  (kept for it), ``s_c = q . k_c * scale`` (every forward checks on the diagonal that the
  scores are ``q_rot . k_rot * scale``); ``a`` is read off the model's own softmax, ``a = s_qq -
  log A_qq`` (the query's own key is always kept; rows with ``A_qq < 1e-30`` take the
  logsumexp), and ``z`` is blended at ``hook_z``.
- ``decode`` (`workbench.forward.eviction`): DuoAttention's protocol. The context is prefilled in
  chunks (streaming heads masked as above), then the dropped entries are *deleted* from the KV
  cache (running sums of the evicted keys and values are kept for the compensation), then the
  last prompt tokens and the answer are fed one token at a time, each step evicting the key
  that leaves the window. ``s_c = q . mean(K_evicted) * scale`` from the sums of the entries
  really taken out of the cache, not from the sequence's own keys. Where every KV head of a
  layer streams, the entries are removed from its cache tensors; elsewhere the heads of the
  layer share one tensor, so a deleted slot is zeroed and masked (its zero key would score 0,
  not minus infinity), and every step checks that those slots really score 0 (the eviction
  reached the cache the model reads) and refuses otherwise.

Both modes refuse what they cannot do exactly: streaming a layer the model already slides
natively (Gemma 3's local layers), logit soft-capping, attention masks (padding), and a KV cache
they did not see filled (prefix reuse).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.hooks import hook_name, hooked, kv_group

if TYPE_CHECKING:
    from workbench.forward.plan import KVPlan
    from workbench.models.loading import LoadedModel

MODES = ("mask", "decode")


def native_windows(model: LoadedModel) -> dict[int, int]:
    """``{layer: window}`` of the layers the model itself restricts to a sliding window."""
    hf = getattr(model.bridge, "original_model", None)
    cfg = getattr(hf, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if not types or not window:
        return {}
    return {i: int(window) for i, t in enumerate(types) if t == "sliding_attention"}


def check_plan(model: LoadedModel, plan: KVPlan) -> dict[int, list[int]]:
    """``{layer: [streaming KV heads]}``; one-line errors when ``plan`` does not fit ``model``."""
    if plan.grid != (model.n_layers, model.n_kv_heads):
        raise WorkbenchError(
            f"KV plan is for a {plan.grid[0]} x {plan.grid[1]} grid ({plan.model}), but "
            f"{model.name} has {model.n_layers} layers x {model.n_kv_heads} KV heads",
            "build the plan from this model's scores",
        )
    if plan.model != model.name:
        raise WorkbenchError(
            f"KV plan was built for {plan.model}, not {model.name}", "use a plan of this model"
        )
    native = native_windows(model)
    stream: dict[int, list[int]] = {}
    for layer in range(model.n_layers):
        heads = [g for g in range(model.n_kv_heads) if (layer, g) not in plan.full]
        if heads and layer in native:
            raise WorkbenchError(
                f"KV plan streams layer {layer}, which {model.name} already slides (window "
                f"{native[layer]})",
                "stream only the model's global layers (build the plan with native=)",
            )
        if heads:
            attn = model.bridge.blocks[layer].attn.original_component
            if getattr(attn, "attn_logit_softcapping", None) is not None:
                raise WorkbenchError(
                    f"layer {layer} soft-caps its attention logits; streaming is not exact there",
                    "use a model without attention soft-capping",
                )
            stream[layer] = heads
    return stream


@dataclass
class _Layer:
    """Per-layer state of the streaming heads (query heads ``q_idx`` read KV heads
    ``kv_idx``)."""

    layer: int
    kv_heads: list[int]
    q_idx: Tensor
    kv_idx: Tensor
    scale: float
    kv_heads_t: Tensor  # the streaming KV heads as an index
    kv_local: Tensor  # per streaming query head, its KV head's index among kv_heads
    all_heads: bool  # every query head of the layer streams
    values: Tensor | None = None  # [b, pos, g, d]: the streaming KV heads' values (mask mode)
    keys: Tensor | None = None  # [b, pos, g, d]: their rotated keys
    pending: Tensor | None = None  # this forward's new values
    pending_k: Tensor | None = None
    rot_q: Tensor | None = None  # this forward's rotated queries (decode mode)
    blend: tuple[Tensor, Tensor, Tensor] | None = None  # (weight of z_kept, v_c, has)
    pending_blend: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # (kept, s_c, n, v_c)
    # decode mode: sums of the evicted keys / values of the streaming KV heads, and how many
    ksum: Tensor | None = None
    vsum: Tensor | None = None
    evicted: int = 0  # positions [sink, sink + evicted) are deleted from the cache
    compact: bool = False  # ... and physically removed (every KV head of the layer streams)


class StreamAttention:
    """Context manager: ``plan``'s streaming heads attend to sink + window (+ compensation) in
    every forward of ``model`` inside it (module docstring). Hooks are always removed."""

    def __init__(self, model: LoadedModel, plan: KVPlan, *, mode: str = "mask") -> None:
        if mode not in MODES:
            raise WorkbenchError(f"unknown KV plan mode '{mode}'", "use mask or decode")
        self.model, self.plan, self.mode = model, plan, mode
        stream = check_plan(model, plan)
        group = kv_group(model.n_heads, model.n_kv_heads)
        device = model.device
        self.layers: dict[int, _Layer] = {}
        for layer, heads in stream.items():
            q = [g * group + j for g in heads for j in range(group)]
            attn = model.bridge.blocks[layer].attn.original_component
            scale = float(getattr(attn, "scaling", model.cfg.d_head**-0.5))
            self.layers[layer] = _Layer(
                layer,
                heads,
                torch.tensor(q, device=device),
                torch.tensor([h // group for h in q], device=device),
                scale,
                torch.tensor(heads, device=device),
                torch.tensor([heads.index(h // group) for h in q], device=device),
                len(q) == model.n_heads,
            )
        self._decoding = False  # decode mode, after the eviction: one token per forward

    # ----------------------------------------------------------------- hooks
    def hooks(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        rotary = hook_name("rot_q", 0) in self.model.bridge.hook_dict  # no RoPE: q and k as is
        for layer, st in self.layers.items():
            out.append((hook_name("v", layer), self._v_hook(st)))
            out.append((hook_name("rot_q" if rotary else "q", layer), self._q_hook(st)))
            out.append((hook_name("rot_k" if rotary else "k", layer), self._k_hook(st)))
            out.append((hook_name("scores", layer), self._scores_hook(st)))
            out.append((hook_name("pattern", layer), self._pattern_hook(st)))
            out.append((hook_name("z", layer), self._z_hook(st)))
        return out

    def _v_hook(self, st: _Layer) -> Any:
        def hook(v: Tensor, hook: Any) -> None:
            st.pending = v.detach()[:, :, st.kv_heads_t]  # [b, pos, g, d]

        return hook

    def _q_hook(self, st: _Layer) -> Any:
        def hook(q: Tensor, hook: Any) -> None:
            st.rot_q = q.detach()  # [b, pos, n_heads, d]

        return hook

    def _k_hook(self, st: _Layer) -> Any:
        def hook(k: Tensor, hook: Any) -> None:
            st.pending_k = k.detach()[:, :, st.kv_heads_t]  # [b, pos, g, d], rotated

        return hook

    def _check_scores(self, st: _Layer, s: Tensor) -> None:
        """The scores must be ``q_rot . k_rot * scale`` (what the compensation's score assumes):
        checked on the diagonal of every forward, an O(T d) check; refuses otherwise."""
        n_q, n_k = int(s.shape[-2]), int(s.shape[-1])
        if st.rot_q is None or st.keys is None:
            raise WorkbenchError("streaming attention saw no rotated queries/keys", "report this")
        q = st.rot_q[:, :, st.q_idx].float()  # [b, q, h, d]
        k = st.keys[:, n_k - n_q :, st.kv_local].float()  # [b, q, h, d]
        want = (q * k).sum(-1).transpose(1, 2) * st.scale  # [b, h, q]
        got = s.diagonal(n_k - n_q, -2, -1)[:, st.q_idx].float()  # the key of the query itself
        tol = 1e-3 * (1.0 + float(want.abs().max()))
        if s.dtype != torch.float32:
            tol *= 30
        if float((got - want).abs().max()) > tol:
            raise WorkbenchError(
                f"layer {st.layer}'s attention scores are not q_rot . k_rot * scale (a norm after "
                "the rotation, a changed bridge?): the compensation score would be wrong",
                "run plans without compensation or use the pinned TransformerLens",
            )

    def _scores_hook(self, st: _Layer) -> Any:
        plan = self.plan

        def hook(s: Tensor, hook: Any) -> Tensor:
            n_q, n_k = int(s.shape[-2]), int(s.shape[-1])
            new = st.pending
            if new is None or int(new.shape[1]) != n_q:
                raise WorkbenchError(
                    "streaming attention lost track of the values (an attention mask or an "
                    "unsupported bridge version?)",
                    "run plans on unpadded prompts with this workbench's pinned versions",
                )
            if self._decoding:
                return self._decode_scores(st, s, n_k)
            if n_k == n_q:
                st.values = st.keys = None  # a fresh sequence
            elif st.values is None or st.keys is None or int(st.values.shape[1]) < n_k - n_q:
                raise WorkbenchError(
                    "streaming attention met a KV cache it did not see filled (prefix reuse?)",
                    "prefill every sequence inside the plan (reuse=False)",
                )
            st.values = _extend(st.values, st.pending, n_k - n_q)
            st.keys = _extend(st.keys, st.pending_k, n_k - n_q)
            self._check_scores(st, s)
            qpos = torch.arange(n_k - n_q, n_k, device=s.device)
            hi = qpos - plan.window  # D(q) = [sink, q - window] under a causal mask
            n = (hi - plan.sink + 1).clamp(min=0)  # [q]
            if int(n.max()) == 0:
                st.blend = None
                return s
            kpos = torch.arange(n_k, device=s.device)
            drop = (kpos[None, :] >= plan.sink) & (kpos[None, :] <= hi[:, None])  # [q, k]
            # means over D(q) from prefix sums over positions: C[hi] - C[sink - 1]
            k_c, v_c = (_range_mean(x, plan.sink, hi, n) for x in (st.keys, st.values))
            assert st.rot_q is not None  # checked by _check_scores
            q = st.rot_q[:, :, st.q_idx].float()  # [b, q, h, d]
            s_c = (q * k_c[:, :, st.kv_local]).sum(-1).transpose(1, 2) * st.scale  # [b, h, q]
            v_c = v_c[:, :, st.kv_local].transpose(1, 2)  # [b, h, q, d]
            if st.all_heads:
                s.masked_fill_(drop, torch.finfo(s.dtype).min)
                kept = s
            else:
                kept = s[:, st.q_idx].masked_fill(drop, torch.finfo(s.dtype).min)
                s[:, st.q_idx] = kept
            n_bhq = n.expand(s_c.shape)
            self._stash(st, kept, s_c, n_bhq, v_c.to(s.dtype))
            return s

        return hook

    def _stash(self, st: _Layer, kept: Tensor, s_c: Tensor, n: Tensor, v_c: Tensor) -> None:
        """Keep what the blend of z needs until the pattern is known (``_pattern_hook``)."""
        st.blend = None
        if self.plan.compensation:
            st.pending_blend = (kept, s_c.float(), n, v_c)

    def _pattern_hook(self, st: _Layer) -> Any:
        """``a = logsumexp_{k kept} s_qk`` from the model's own softmax: the query's own key is
        always kept, so ``a = s_qq - log A_qq`` (O(T) instead of O(T^2)); rows where ``A_qq``
        is too small for that (< 1e-30) take the logsumexp of their kept scores."""

        def hook(pattern: Tensor, hook: Any) -> None:
            if st.pending_blend is None:
                return
            kept, s_c, n, v_c = st.pending_blend
            st.pending_blend = None
            off = int(kept.shape[-1]) - int(kept.shape[-2])
            sub = kept  # [b, h, q, k]: the streaming heads' kept scores
            p_qq = pattern.diagonal(off, -2, -1)[:, st.q_idx].float()  # [b, h, q]
            a = sub.diagonal(off, -2, -1).float() - torch.log(p_qq.clamp(min=1e-45))
            tiny = p_qq < 1e-30
            if bool(tiny.any()):
                a[tiny] = torch.logsumexp(sub.float()[tiny], dim=-1)
            b = s_c + (torch.log(n.clamp(min=1).float()) if self.plan.weighted else 0.0)
            st.blend = (torch.sigmoid(a - b), v_c, n > 0)

        return hook

    def _z_hook(self, st: _Layer) -> Any:
        def hook(z: Tensor, hook: Any) -> Tensor:
            if st.blend is None:
                return z
            w, v_c, has = st.blend  # [b, h, q], [b, h, q, d], [b, h, q]
            st.blend = None
            cur = z[:, :, st.q_idx]  # [b, q, h, d]
            w = w.transpose(1, 2)[..., None].to(z.dtype)
            mixed = w * cur + (1 - w) * v_c.transpose(1, 2).to(z.dtype)
            out = z.clone()
            out[:, :, st.q_idx] = torch.where(has.transpose(1, 2)[..., None], mixed, cur)
            return out

        return hook

    # ----------------------------------------------------------- decode mode
    def _decode_scores(self, st: _Layer, s: Tensor, n_k: int) -> Tensor:
        """One decoding step (one query at position ``n_k - 1``): deleted slots are masked, the
        compensation comes from the evicted sums (module docstring)."""
        plan = self.plan
        if int(s.shape[-2]) != 1:
            raise WorkbenchError(
                "decode mode feeds one token per forward after the eviction", "feed tokens singly"
            )
        lo, hi = plan.sink, plan.sink + (0 if st.compact else st.evicted)
        sub = s[:, st.q_idx]  # [b, h, 1, k]
        gone = sub[..., lo:hi]
        if hi > lo and bool((gone != 0).any()):
            raise WorkbenchError(
                "evicted KV-cache entries still score non-zero: the eviction did not reach the "
                "cache the model reads (a changed transformers cache layout?)",
                "use the pinned transformers version",
            )
        kept = sub.clone()
        kept[..., lo:hi] = torch.finfo(s.dtype).min
        if st.evicted == 0:
            st.blend = None
        else:
            n = torch.full(sub.shape[:-1], st.evicted, device=s.device)
            if st.rot_q is None or st.ksum is None or st.vsum is None:
                raise WorkbenchError("decode mode: no query or sums recorded", "report this")
            q = st.rot_q[:, -1:, st.q_idx].transpose(1, 2)  # [b, h, 1, d]
            k_c = (st.ksum / st.evicted)[:, st.kv_idx][:, :, None]  # [b, h, 1, d]
            s_c = (q.float() * k_c.float()).sum(-1) * st.scale
            v_c = (st.vsum / st.evicted)[:, st.kv_idx][:, :, None]
            self._stash(st, kept, s_c, n, v_c.to(s.dtype))
        out = s.clone()
        out[:, st.q_idx] = kept
        return out

    def seed(self, cache: Any) -> None:
        """Continue from ``cache``, prefilled *without* the plan: exact while no query of it
        dropped anything (at most ``sink + window`` positions), so every plan can share one
        prefix. Reads the streaming heads' cached (rotated) keys and values into the stores."""
        limit = self.plan.sink + self.plan.window
        for layer, st in self.layers.items():
            entry = cache.layers[layer]
            keys, values = getattr(entry, "keys", None), getattr(entry, "values", None)
            if keys is None or values is None or getattr(entry, "is_sliding", False):
                raise WorkbenchError(
                    f"layer {layer}'s KV cache is not a plain tensor cache", "use pinned versions"
                )
            if int(keys.shape[2]) > limit:
                raise WorkbenchError(
                    f"a shared prefix of {int(keys.shape[2])} tokens is longer than sink + "
                    f"window ({limit}): the plan would have dropped keys in it",
                    f"share at most {limit} tokens",
                )
            st.keys = keys[:, st.kv_heads_t].transpose(1, 2).clone()
            st.values = values[:, st.kv_heads_t].transpose(1, 2).clone()

    def start_decoding(self) -> None:
        """From here on one token per forward, after an eviction; the per-sequence stores of
        mask mode are not needed any more (the compensation comes from the evicted sums)."""
        self._decoding = True
        for st in self.layers.values():
            st.values = st.keys = None

    def __enter__(self) -> StreamAttention:
        self._cm = hooked(self.model.bridge, self.hooks())
        self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for st in self.layers.values():
            st.values = st.keys = st.pending = st.pending_k = None
            st.rot_q = st.blend = st.pending_blend = st.ksum = st.vsum = None
            st.evicted, st.compact = 0, False
        self._decoding = False
        self._cm.__exit__(*exc)


def _extend(old: Tensor | None, new: Tensor | None, keep: int) -> Tensor:
    """``old[:, :keep]`` followed by ``new`` along positions (a cache cropped back is fine)."""
    if new is None:
        raise WorkbenchError("streaming attention saw no keys/values", "report this")
    if old is None or keep == 0:
        return new
    return torch.cat([old[:, :keep], new], dim=1)


def _range_mean(
    x: Float[Tensor, "b k g d"], lo: int, hi: Int[Tensor, " q"], n: Int[Tensor, " q"]
) -> Float[Tensor, "b q g d"]:
    """``mean_{k = lo}^{hi[q]} x[:, k]`` per query (0 where the range is empty), by prefix
    sums: ``(C[hi] - C[lo - 1]) / n``."""
    csum = x.float().cumsum(1)
    top = csum[:, hi.clamp(min=0)]
    if lo > 0:
        top = top - csum[:, lo - 1][:, None]
    return torch.where((n > 0)[None, :, None, None], top / n.clamp(min=1)[None, :, None, None], 0)


@contextmanager
def streaming(model: LoadedModel, plan: KVPlan) -> Iterator[StreamAttention]:
    """``with streaming(model, plan): model.bridge(tokens)`` runs ``plan`` in mask mode."""
    with StreamAttention(model, plan, mode="mask") as s:
        yield s


@torch.no_grad()
def plan_logits(
    model: LoadedModel, plan: KVPlan, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos vocab"]:
    """Logits of unpadded ``tokens`` with ``plan`` in mask mode (one forward)."""
    with streaming(model, plan):
        return model.bridge(tokens, prepend_bos=False, return_type="logits")
