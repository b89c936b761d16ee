"""Causal evaluation of a KV-cache plan: parameters, stored inputs and registry entry
(torch-free; ``compute.py`` runs the plans, ``oracle.py`` the exhaustive ranking)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.types import Analysis


@dataclass(frozen=True)
class KVPlanEvalParams:
    """A plan built by ``rule`` from a stored per-KV-head score run (or a stored plan), run on
    needle samples against full attention and against control plans at the same number of full
    KV heads (``kv_plan_eval.compute``)."""

    scores_run: str = field(
        default="", metadata={"help": "stored kv_head_scores / moa_influence run (id or prefix)"}
    )
    extra_runs: tuple[str, ...] = field(
        default=(),
        metadata={"help": "per-head runs (retrieval_heads, attention_sinks, ...) pooled per KV "
                  "head into the scores (max / mean / sum over the heads sharing it)"},
    )  # fmt: skip
    plan_run: str = field(
        default="", metadata={"help": "a stored kv_plan run instead of building one (optional)"}
    )
    rule: Literal["razor", "top_k", "threshold", "quantile", "budget"] = field(
        default="razor", metadata={"help": "how the plan picks its full KV heads"}
    )
    metric: str = field(
        default="induction", metadata={"help": "score ranked by top_k/threshold/quantile/budget"}
    )
    column: str = field(default="max", metadata={"help": "kv_heads column: max, mean or sum"})
    k: int = field(default=0, metadata={"help": "top_k: full KV heads"})
    threshold: float = field(default=0.0, metadata={"help": "threshold: score above which full"})
    quantile: float = field(default=0.5, metadata={"help": "quantile: scores above it are full"})
    budget: float = field(default=0.3, metadata={"help": "budget: kv_fraction at the context"})
    induction_share: float = field(default=0.14, metadata={"help": "razor: induction share"})
    echo_share: float = field(default=0.01, metadata={"help": "razor: echo share"})
    sink: int = field(default=4, metadata={"help": "initial tokens every streaming head keeps"})
    window: int = field(default=256, metadata={"help": "recent tokens every streaming head keeps"})
    compensation: bool = field(default=True, metadata={"help": "RazorAttention's mean token"})
    weighted: bool = field(default=True, metadata={"help": "compensation counted per dropped key"})
    mode: Literal["mask", "decode"] = field(
        default="mask", metadata={"help": "mask (one forward) or decode (real eviction)"}
    )
    feed_last: int = field(default=50, metadata={"help": "decode: prompt tokens fed singly"})
    n_random: int = field(default=20, metadata={"help": "random plans per family (>= 1)"})
    seed: int = field(default=0, metadata={"help": "seed of the random plans"})
    curve: tuple[int, ...] = field(
        default=(), metadata={"help": "numbers of full KV heads of the budget curve"}
    )
    curve_random: int = field(default=3, metadata={"help": "random plans per curve point"})
    oracle: bool = field(
        default=False, metadata={"help": "evaluate every plan (at most 10 streamable KV heads)"}
    )
    max_new_tokens: int = field(default=24, metadata={"help": "greedy answer length"})
    ppl_tokens: int = field(
        default=256, metadata={"help": "perplexity over this many positions after sink + window"}
    )

    def validate(self) -> None:
        if not self.scores_run.strip() and not self.plan_run.strip():
            raise WorkbenchError(
                "kv_plan_eval: give scores_run (a kv_head_scores run) or plan_run",
                "run kv_head_scores first and pass its run id",
            )
        if not 0 < self.budget <= 1:
            raise WorkbenchError(f"kv_plan_eval: budget must be in (0, 1], got {self.budget}",
                                 "e.g. budget = 0.3")  # fmt: skip
        if self.sink < 0 or self.window < 1:
            raise WorkbenchError("kv_plan_eval: sink >= 0 and window >= 1", "e.g. 4 and 256")
        if self.n_random < 1 or self.curve_random < 0:
            raise WorkbenchError("kv_plan_eval: n_random must be >= 1", "use n_random = 20")
        if any(k < 0 for k in self.curve):
            raise WorkbenchError("kv_plan_eval: curve points are numbers of heads >= 0", "fix")
        if self.max_new_tokens < 1 or self.feed_last < 1 or self.ppl_tokens < 1:
            raise WorkbenchError(
                "kv_plan_eval: max_new_tokens, feed_last, ppl_tokens >= 1", "use defaults"
            )
        if self.column not in ("max", "mean", "sum"):  # circuits.kvplans.KV_POOLS
            raise WorkbenchError(f"kv_plan_eval: unknown column '{self.column}'", "max/mean/sum")


def plan_inputs(params: KVPlanEvalParams, store: Any) -> dict[str, Any]:
    """The stored inputs: the KV-head score table (and a stored plan's JSON), read once by the
    runner from the store it holds; one-line errors when a run is missing or of the wrong kind."""
    from workbench.circuits.kvplans import load_plan

    out: dict[str, Any] = {"plan": None, "kv_table": None, "scores_run": ""}
    if params.plan_run.strip():
        plan = load_plan(store, params.plan_run)
        out["plan"] = plan.to_dict()
    sources = (out["plan"] or {}).get("sources") or [""]
    run = params.scores_run.strip() or sources[0]
    scored = None
    if run:
        scored = store.load(run)
        if "kv_heads" not in scored.tables:
            raise WorkbenchError(
                f"run {scored.run_id} ({scored.key.get('analysis')}) has no KV-head scores",
                "give a kv_head_scores or moa_influence run",
            )
        out["kv_table"] = scored.tables["kv_heads"]
        out["scores_run"] = scored.run_id
    extra = []
    for rid in params.extra_runs:
        if scored is None or out["kv_table"] is None:
            raise WorkbenchError("extra_runs need scores_run too", "give a kv_head_scores run")
        res = store.load(rid)
        if res.key.get("model") != scored.key.get("model"):
            raise WorkbenchError(
                f"extra run {res.run_id} is of {res.key.get('model')}, the scores of "
                f"{scored.key.get('model')}",
                "give runs of one model",
            )
        n_kv = int(out["kv_table"]["kv_head"].max()) + 1
        from workbench.circuits.kvplans import pool_kv_heads

        pooled = pool_kv_heads(res.heads, n_kv, res.head_axis)
        extra.append(pooled[~pooled["metric"].isin(set(out["kv_table"]["metric"]))])
    if extra:
        import pandas as pd

        out["kv_table"] = pd.concat([out["kv_table"], *extra], ignore_index=True)
    return out


def _load() -> Any:
    from workbench.analyses.kv_plan_eval.compute import kv_plan_eval

    return kv_plan_eval


ENTRY = Analysis(
    name="kv_plan_eval",
    description="a KV-cache plan (full vs sink+window KV heads) on needle samples against full "
    "attention and random plans of the same budget: recall, answer log-probability, "
    "perplexity, KL; percentile and permutation p-value; recall-vs-budget curve",
    params_cls=KVPlanEvalParams,
    loader=_load,
    default_task="needle",
    task_kind="needle",
    inputs=plan_inputs,
    tasks=("needle",),
    reference="Tang et al. 2024 (RazorAttention); Xiao et al. 2024 (DuoAttention)",
)
