"""Edge-level circuits (EAP, EAP-IG), their faithfulness under a panel of ablations, and the
exact check of the estimates: parameters, stored inputs and registry entry (torch-free;
``compute.py`` computes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.types import Analysis

METHODS = ("eap", "eap_ig")
ABLATIONS = ("corrupted", "mean_clean", "mean_corrupt", "zero")
DIRECTIONS = ("ablate_complement", "ablate_circuit")
MIB_FRACTIONS = "0.001,0.002,0.005,0.01,0.02,0.05,0.1,0.2,0.5,1"


def split_list(text: str) -> list[str]:
    return [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]


def _choices(name: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    items = split_list(text)
    if not items:
        raise WorkbenchError(
            f"edge_circuits: {name} is empty", f"give some of {', '.join(allowed)}"
        )
    for item in items:
        if item not in allowed:
            raise WorkbenchError(
                f"edge_circuits: unknown {name[:-1]} '{item}'", f"choose from {', '.join(allowed)}"
            )
    return items


@dataclass(frozen=True)
class EdgeCircuitsParams:
    """Edge scores by EAP / EAP-IG, circuits of growing size, their faithfulness curves for each
    ablation and direction (with random orderings), and exact patching of top and random edges."""

    methods: str = field(default="eap,eap_ig", metadata={"help": "eap and/or eap_ig"})
    steps: int = field(default=5, metadata={"help": "EAP-IG interpolation steps m (>= 1)"})
    metric: Literal["logit_diff", "prob", "loss"] = field(
        default="logit_diff", metadata={"help": "the metric scored and plotted"}
    )
    rule: Literal["top_n", "greedy"] = field(
        default="top_n", metadata={"help": "top-n edges, or greedy from the logits; then pruned"}
    )
    fractions: str = field(
        default=MIB_FRACTIONS, metadata={"help": "circuit sizes as fractions of all edges (MIB's)"}
    )
    sizes: str = field(default="", metadata={"help": "circuit sizes in edges (replaces fractions)"})
    ablations: str = field(
        default=",".join(ABLATIONS), metadata={"help": "corrupted, mean_clean, mean_corrupt, zero"}
    )
    directions: str = field(
        default=",".join(DIRECTIONS), metadata={"help": "ablate_complement and/or ablate_circuit"}
    )
    n_random: int = field(default=3, metadata={"help": "random edge orderings (the baseline)"})
    random_panel: bool = field(
        default=False, metadata={"help": "random orderings for every ablation, not only the first"}
    )
    n_exact: int = field(
        default=200, metadata={"help": "top and random edges per method patched exactly (0: none)"}
    )
    edges: str = field(
        default="", metadata={"help": "more edges to patch exactly, e.g. 'L0H1->L2H3.q'"}
    )
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples of the prompts"})
    threshold: float = field(
        default=0.8,
        metadata={"help": "the chosen circuit: smallest size from which all larger ones reach it"},
    )
    heads_run: str = field(
        default="",
        metadata={"help": "a stored head circuit or per-head run to overlap the chosen heads with"},
    )
    heads_metric: str = field(default="", metadata={"help": "that per-head run's metric"})
    seed: int = field(default=0, metadata={"help": "random orderings, edges and bootstrap"})
    batch_size: int = field(default=16, metadata={"help": "prompts per EAP batch"})
    batch_tokens: int = field(default=1024, metadata={"help": "rows x positions per ablated run"})

    def validate(self) -> None:
        _choices("methods", self.methods, METHODS)
        _choices("ablations", self.ablations, ABLATIONS)
        _choices("directions", self.directions, DIRECTIONS)
        if self.steps < 1:
            raise WorkbenchError(
                f"edge_circuits: steps (EAP-IG's m) must be >= 1, got {self.steps}", "use steps = 5"
            )
        for name, value in (("n_random", self.n_random), ("n_exact", self.n_exact),
                            ("n_boot", self.n_boot)):  # fmt: skip
            if value < 0:
                raise WorkbenchError(
                    f"edge_circuits: {name} must be >= 0, got {value}", f"{name} = 0"
                )
        if not 0 < self.threshold <= 1:
            raise WorkbenchError(
                f"edge_circuits: threshold must be in (0, 1], got {self.threshold}", "use 0.8"
            )
        try:
            [float(f) for f in split_list(self.fractions)]
            [int(s) for s in split_list(self.sizes)]
        except ValueError:
            raise WorkbenchError(
                "edge_circuits: fractions / sizes must be comma-separated numbers",
                "e.g. fractions = '0.01,0.1,1' or sizes = '10,100,1000'",
            ) from None
        if not split_list(self.sizes) and not split_list(self.fractions):
            raise WorkbenchError(
                "edge_circuits: no circuit sizes", f"fractions = '{MIB_FRACTIONS}'"
            )


def heads_inputs(params: EdgeCircuitsParams, store: Any) -> dict[str, Any]:
    """The heads the chosen circuits are compared with: a stored circuit's heads, or a per-head
    run's ``heads_metric`` matrix (its top heads are taken at the circuit's size)."""
    run = params.heads_run.strip()
    if not run:
        return {}
    res = store.load(run)
    if res.key.get("analysis") == "circuit":
        from workbench.circuits.io import load_circuit, sorted_heads

        c = load_circuit(store, res.run_id)
        return {"head_circuit": {"name": res.run_id, "heads": [str(h) for h in sorted_heads(c)]}}
    metrics = res.metrics
    metric = params.heads_metric or (metrics[0] if metrics else "")
    if metric not in metrics:
        raise WorkbenchError(
            f"run {res.run_id} has no per-head metric '{metric}'", f"choose from {metrics}"
        )
    matrix = res.matrix(metric).to_numpy(dtype=float).tolist()
    return {"head_circuit": {"name": f"{res.run_id}:{metric}", "scores": matrix}}


def _load() -> Any:
    from workbench.analyses.edge_circuits.compute import edge_circuits

    return edge_circuits


ENTRY = Analysis(
    name="edge_circuits",
    description="edge attribution (EAP, EAP-IG) on the GQA-native edge graph, circuits of growing "
    "size, faithfulness curves per ablation (corrupted, means, zero) and direction with bootstrap "
    "intervals, MIB's CPR/CMD and auto-circuit's random-normalised area, exact patching of top "
    "and random edges",
    params_cls=EdgeCircuitsParams,
    loader=_load,
    default_task="ioi",
    inputs=heads_inputs,
    variant_params=("rule", "metric"),
    reference="Syed et al. 2023 (EAP); Hanna et al. 2024 (EAP-IG); Miller et al. 2024 "
    "(auto-circuit); Mueller et al. 2025 (MIB)",
)
