"""The final norm and the unembedding written out: the residual stream's components at the
final position and their direct effect on the logits (direct logit attribution, the logit
lens, edge attribution to the logits all read these).

Direct logit attribution (Elhage et al. 2021; Wang et al. 2022). The residual stream at the
final position is a sum of what every component wrote into it::

    x = embed + sum_l (attn_out_l + mlp_out_l)
    attn_out_l = post_l( sum_h z_h @ W_O[h] + b_O )      (post_l = identity, or Gemma 3's
                                                          post-attention RMSNorm, scale frozen)

``embed`` is ``hook_resid_pre`` of layer 0 (token plus positional embeddings, Gemma's
``sqrt(d_model)`` scaling included); ``mlp_out_l`` is ``hook_mlp_out`` (after Gemma 3's
post-feedforward norm: what is added to the stream). With the final norm's scale ``s`` taken
from the actual run and frozen, the logits are linear in ``x``::

    RMSNorm (Llama, Gemma):  N(c) = c * s * w               s = 1 / sqrt(mean(x^2) + eps)
    LayerNorm (GPT-2):       N(c) = (c - mean(c)) * s * w   s = 1 / sqrt(var(x) + eps)
    DLA(c) = N(c) . (W_U[:, correct] - W_U[:, incorrect])

(Gemma's RMSNorm weight is applied as ``1 + w``.) The constant terms (the final LayerNorm's bias
and the unembedding bias) form the component ``final_bias``. The components therefore sum
*exactly* (up to floating point) to the logit difference ``logit[correct] - logit[incorrect]``;
``direct_logit_attribution`` reports the largest deviation in ``info["identity"]``. Where the
config sets ``final_logit_softcapping``, the identity holds for the logits before the soft-cap.

Per head, the post-attention norm (where present) is frozen at its actual scale too, so the
heads' contributions plus the ``attn_bias`` share sum to ``hook_attn_out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.hooks import record
from workbench.metrics import logit_diff

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel
    from workbench.types import PromptSet


@dataclass(frozen=True)
class Norm:
    """An RMSNorm or LayerNorm written out: ``kind``, effective weight, bias, epsilon."""

    kind: str  # "rms" or "ln"
    weight: Tensor
    bias: Tensor | None
    eps: float

    @classmethod
    def of(cls, module: Any) -> Norm:
        name = type(module).__name__
        w = module.weight.detach().float()
        if isinstance(module, torch.nn.LayerNorm):
            b = module.bias.detach().float() if module.bias is not None else None
            return cls("ln", w, b, float(module.eps))
        if "RMSNorm" not in name:
            raise WorkbenchError(f"unsupported norm {name}", "use a Llama, GPT-2 or Gemma 3 model")
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        weight = w + 1.0 if "Gemma" in name else w  # Gemma scales by (1 + w)
        return cls("rms", weight, None, float(eps))

    def scale(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... 1"]:
        if self.kind == "ln":
            return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + self.eps)
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def frozen(self, c: Float[Tensor, "... d"], scale: Tensor) -> Float[Tensor, "... d"]:
        """The linear part of the norm with ``scale`` frozen, applied to a component ``c``."""
        if self.kind == "ln":
            c = c - c.mean(-1, keepdim=True)
        return c * scale * self.weight

    def __call__(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        out = self.frozen(x, self.scale(x))
        return out + self.bias if self.bias is not None else out


def original(component: Any) -> Any:
    """The HF module a bridge component wraps (the component itself if it wraps none)."""
    return getattr(component, "original_component", component)


def final_norm(model: LoadedModel) -> Norm:
    return Norm.of(original(model.bridge.ln_final))


def softcap(model: LoadedModel) -> float | None:
    """``final_logit_softcapping`` of the HF config (the HF forward the bridge runs applies
    it), else TransformerLens's ``output_logits_soft_cap`` when positive; ``None`` when unset."""
    hf_cfg = getattr(getattr(model.bridge, "original_model", None), "config", None)
    cap = getattr(hf_cfg, "final_logit_softcapping", None)
    if cap is None and hf_cfg is None:
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return float(cap) if cap and cap > 0 else None


def unembed(
    model: LoadedModel, normed: Float[Tensor, "batch d_model"]
) -> Float[Tensor, "batch vocab"]:
    """``normed @ W_U + b_U``, then the soft-cap ``cap * tanh(logits / cap)`` if configured."""
    logits = normed @ model.bridge.W_U.float() + model.bridge.b_U.float()
    cap = softcap(model)
    return cap * torch.tanh(logits / cap) if cap else logits


@dataclass(eq=False)
class FinalComponents:
    """Everything written into the residual stream at the final position, per prompt."""

    embed: Float[Tensor, "batch d_model"]
    heads: Float[Tensor, "batch n_layers n_heads d_model"]
    attn_bias: Float[Tensor, "batch n_layers d_model"]
    mlp: Float[Tensor, "batch n_layers d_model"]
    attn_out: Float[Tensor, "batch n_layers d_model"]  # hook_attn_out, for checks
    resid_post: Float[Tensor, "batch n_layers d_model"]  # after each layer (logit lens)
    logits: Float[Tensor, "batch vocab"]  # the model's final-position logits


def final_components(model: LoadedModel, tokens: Int[Tensor, "batch pos"]) -> FinalComponents:
    """One forward pass; hooks keep only the final position (nothing else is cached)."""
    n_layers = model.n_layers
    kinds = ("z", "attn_out", "mlp_out", "resid_post")
    points = [("resid_pre", 0), *((k, la) for la in range(n_layers) for k in kinds)]
    rec = record(
        model.bridge,
        tokens,
        points,
        keep=lambda x: x[:, -1].detach().float().clone(),
        logits="last",
    )
    got = rec.acts
    assert rec.logits is not None
    logits = rec.logits.float()
    heads, biases = [], []
    with torch.no_grad():
        for layer in range(n_layers):
            attn = model.bridge.blocks[layer].attn
            per_head = torch.einsum("bhd,hdm->bhm", got[("z", layer)], attn.W_O.float())
            b_o = getattr(attn, "b_O", None)
            bias = b_o.float().expand(per_head.shape[0], -1) if b_o is not None else None
            bias = torch.zeros_like(per_head[:, 0]) if bias is None else bias
            post = getattr(model.bridge.blocks[layer], "ln1_post", None)
            if post is not None:  # Gemma 3: freeze the post-attention norm at its actual scale
                norm = Norm.of(original(post))
                s = norm.scale(per_head.sum(1) + bias)
                per_head = norm.frozen(per_head, s[:, None])
                bias = norm.frozen(bias, s)
            heads.append(per_head)
            biases.append(bias)
    stack = lambda kind: torch.stack([got[(kind, la)] for la in range(n_layers)], 1)  # noqa: E731
    return FinalComponents(
        embed=got[("resid_pre", 0)],
        heads=torch.stack(heads, 1),
        attn_bias=torch.stack(biases, 1),
        mlp=stack("mlp_out"),
        attn_out=stack("attn_out"),
        resid_post=stack("resid_post"),
        logits=logits,
    )


def attribute(
    model: LoadedModel,
    comps: FinalComponents,
    correct: Int[Tensor, " batch"],
    incorrect: Int[Tensor, " batch"],
) -> dict[str, Tensor]:
    """Per-prompt DLA of every component and the logit difference it must sum to.

    Returns ``embed [b]``, ``heads [b, L, H]``, ``attn_bias [b, L]``, ``mlp [b, L]``,
    ``final_bias [b]``, ``total [b]`` (their sum) and ``target [b]`` (the actual logit
    difference, before the soft-cap where there is one).
    """
    norm = final_norm(model)
    x = comps.resid_post[:, -1]
    s = norm.scale(x)
    w_u = model.bridge.W_U.float()
    b_u = model.bridge.b_U.float()
    direction = (w_u[:, correct] - w_u[:, incorrect]).T  # [b, d_model]

    def dla(c: Tensor) -> Tensor:  # c: [b, ..., d_model]
        extra = c.ndim - 2
        sc = s.reshape(s.shape[0], *([1] * extra), 1)
        d = direction.reshape(direction.shape[0], *([1] * extra), direction.shape[1])
        return (norm.frozen(c, sc) * d).sum(-1)

    out = {
        "embed": dla(comps.embed),
        "heads": dla(comps.heads),
        "attn_bias": dla(comps.attn_bias),
        "mlp": dla(comps.mlp),
    }
    const = b_u[correct] - b_u[incorrect]
    if norm.bias is not None:
        const = const + direction @ norm.bias
    out["final_bias"] = const
    out["total"] = (
        out["embed"]
        + out["heads"].sum((1, 2))
        + out["attn_bias"].sum(1)
        + out["mlp"].sum(1)
        + out["final_bias"]
    )
    if softcap(model):
        pre = norm(x) @ w_u + b_u
        out["target"] = logit_diff(pre, correct, incorrect)
    else:
        out["target"] = logit_diff(comps.logits, correct, incorrect)
    return out


def prompt_batches(prompts: PromptSet, size: int) -> Any:
    """``(clean, correct, incorrect)`` of ``size`` prompts at a time."""
    for start in range(0, prompts.n, size):
        stop = start + size
        yield (
            prompts.clean[start:stop],
            prompts.correct[start:stop],
            prompts.incorrect[start:stop],
        )
