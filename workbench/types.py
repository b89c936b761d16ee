"""The domain types: heads, prompt sets, run keys.

Everything here is importable without torch, so the CLI can answer from the results store
without loading a model. Tensors appear only as annotations.
"""

from __future__ import annotations

import functools
import hashlib
import json
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, order=True)
class Head:
    """One attention head, ``Head(layer, head)``; hashable, so circuits are sets of heads."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form every content hash is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_hex(*parts: str | bytes) -> str:
    """sha256 over the given parts, each length-prefixed so ("ab","c") != ("a","bc")."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


@dataclass(eq=False)
class PromptSet:
    """Clean and corrupted prompts of equal token shape with their answer tokens.

    ``clean`` and ``corrupt`` are ``Int[Tensor, "batch pos"]`` (already including BOS when the
    set was built with ``prepend_bos=True``); ``correct`` and ``incorrect`` are
    ``Int[Tensor, "batch"]`` token ids of the answer after the final position. ``meta`` holds
    task-specific facts (e.g. the first position where clean and corrupt differ).
    """

    task: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    correct: torch.Tensor
    incorrect: torch.Tensor
    prompts: tuple[str, ...] = ()
    corrupt_prompts: tuple[str, ...] = ()
    prepend_bos: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    def content_hash(self) -> str:
        """sha256 of the token contents (clean, corrupt, answers) and the task name."""
        import numpy as np

        parts: list[str | bytes] = [self.task, str(self.prepend_bos)]
        for t in (self.clean, self.corrupt, self.correct, self.incorrect):
            a = np.ascontiguousarray(t.detach().cpu().numpy().astype("int64"))
            parts += [str(a.shape), a.tobytes()]
        return sha256_hex(*parts)

    def to(self, device: str) -> PromptSet:
        """The same prompts with their token tensors on ``device`` (itself when already there)."""
        if str(self.clean.device) == str(device):
            return self
        from dataclasses import replace

        return replace(
            self,
            clean=self.clean.to(device),
            corrupt=self.corrupt.to(device),
            correct=self.correct.to(device),
            incorrect=self.incorrect.to(device),
        )

    def __repr__(self) -> str:
        return (
            f"PromptSet(task={self.task!r}, n={self.n}, seq_len={self.seq_len}, "
            f"prepend_bos={self.prepend_bos})"
        )


@dataclass(frozen=True)
class RoleRule:
    """A role label rule of the head atlas, declared on an analysis's registry entry:
    ``role`` is given to a head whose ``metric`` score ``op`` ``threshold`` (``>`` or ``<``)."""

    role: str
    metric: str
    op: str
    threshold: float
    analysis: str | None = None
    source: str = ""

    def matches(self, analysis: str, metric: str) -> bool:
        return self.metric == metric and (self.analysis is None or self.analysis == analysis)

    def label(self, column: str) -> str:
        return f"{self.role}: {column} {self.op} {self.threshold:g}"


Metric = Literal["logit_diff", "norm_logit_diff", "prob", "loss", "kl"]
METRICS: tuple[str, ...] = typing.get_args(Metric)
"""The final-position metrics of the patching family (``workbench.metrics`` computes them)."""
DIRECTIONS = ("denoising", "noising")  # patching: write clean into corrupted, or the reverse

HEAD_AXES = ("head", "kv_head", "none")
"""What the ``head`` column of a per-head table indexes: query heads, KV heads (grouped-query
attention's shared k/v, ``workbench.hooks.kv_group``), or nothing (a per-layer quantity)."""


@dataclass(frozen=True)
class Agreement:
    """Declares that an analysis scores the same per-head quantity as another, one estimating
    what the other measures exactly (attribution vs activation patching, Syed et al. 2023).
    ``effects(result)``: its per-head effect ``[n_layers, n_heads]`` on the common scale;
    ``comparable(params)``: whether a run with these parameters scores that quantity (e.g. a
    sweep over every head); ``match``: the parameters both runs must share."""

    partner: str
    role: str  # "estimate" | "reference"
    effects: Callable[[Any], Any]
    comparable: Callable[[Mapping[str, Any]], bool] | None = None
    match: tuple[str, ...] = ("direction", "metric", "prepend_bos")

    def accepts(self, params: Mapping[str, Any]) -> bool:
        return self.comparable is None or self.comparable(params)


@dataclass(frozen=True)
class Analysis:
    """One registry entry: what an analysis is and everything generic code asks of it.
    ``loader()`` imports and returns the pure function ``(model, prompts, params, **inputs) ->
    AnalysisOutput`` on first call, so listing analyses or serving the store needs no torch."""

    name: str
    description: str
    params_cls: type
    loader: Callable[[], Callable[..., Any]]
    default_task: str
    # "prompts" (PromptSet), "needle" (NeedleSet), "any"; "groups": PromptGroups passed whole
    task_kind: str = "prompts"  # (for the others the runner runs each group and merges them)
    version: str = "1"
    reference: str = ""
    checks: tuple[str, ...] = ()  # self-checks its fast paths need (forward.selfcheck.CHECKS)
    roles: tuple[RoleRule, ...] = ()  # role labels it gives heads in the atlas
    variant_params: tuple[str, ...] = ()  # params that change what its scores mean (atlas)
    tasks: tuple[str, ...] = ()  # tasks the app's Run page offers it (empty: prompt pairs)
    head_page: str = ""  # title of its section on the app's Head page, if any
    # params -> one of HEAD_AXES: what its per-head tables index (default: query heads)
    head_axis: Callable[[Mapping[str, Any]], str] | None = None
    # (store, result, declared): after a fresh result is stored; declared(name) -> Agreement
    after_store: Callable[[Any, Any, Callable[[str], Agreement | None]], Any] | None = None
    # (params, store) -> keyword arguments it reads from the store the runner holds (torch-free)
    inputs: Callable[[Any, Any], dict[str, Any]] | None = None
    agreement: Agreement | None = None  # its pairing with an analysis scoring the same thing
    chooses_heads: bool = False  # its runs list chosen heads in info["chosen"] (interventions)
    # params -> [(task, task_params)] it builds itself: their recipes enter the run key
    data_tasks: Callable[[Any], Sequence[tuple[str, Mapping[str, Any]]]] | None = None

    def load(self) -> Callable[..., Any]:
        return self.loader()

    def parse_params(self, values: Mapping[str, Any] | None) -> Any:
        from workbench import params as P

        return P.from_mapping(self.params_cls, values, where=f"analysis '{self.name}'")

    def describe_params(self) -> list[dict[str, Any]]:
        from workbench import params as P

        return P.describe(self.params_cls)

    def axis(self, params: Mapping[str, Any]) -> str:
        """What the ``head`` column of its per-head tables indexes for ``params``."""
        return "head" if self.head_axis is None else self.head_axis(params)


@dataclass(eq=False)
class PromptGroups:
    """Prompt sets of one task that differ in token length, one :class:`PromptSet` per length
    (shortest first). The runner runs an analysis on each group and merges the outputs into one
    result (:func:`workbench.groups.merge_outputs`): per-head means weighted by the number of
    prompts, standard errors pooled over all prompts."""

    task: str
    groups: tuple[PromptSet, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(g.n for g in self.groups)

    @property
    def seq_len(self) -> int:
        return max(g.seq_len for g in self.groups)

    @property
    def prepend_bos(self) -> bool:
        return self.groups[0].prepend_bos

    def content_hash(self) -> str:
        return sha256_hex(self.task, *(g.content_hash() for g in self.groups))

    def to(self, device: str) -> PromptGroups:
        """The same groups with their tensors on ``device``."""
        from dataclasses import replace

        return replace(self, groups=tuple(g.to(device) for g in self.groups))

    def __repr__(self) -> str:
        lengths = ", ".join(f"{g.seq_len}: {g.n}" for g in self.groups)
        return f"PromptGroups(task={self.task!r}, n={self.n}, prompts by length {{{lengths}}})"


@dataclass(frozen=True)
class RunKey:
    """Everything a result depends on; ``run_id`` is derived from the contents.

    - ``model_fingerprint``: hash of the weights' source (file hash + converter version)
    - ``analysis``: registry name; ``params``: canonical (defaults filled in) parameters
    - ``data_hash``: hash of the prompt recipe (task, its parameters, shipped data files)
    - ``code_version``: the workbench version (and the analysis's own version)
    - ``libraries``: versions of the libraries whose internals the computation relies on
      (torch, transformers, transformer-lens; ``workbench.provenance``); empty for records
      derived from other runs without a model
    """

    model: str
    model_fingerprint: str
    analysis: str
    params: Mapping[str, Any]
    task: str
    data_hash: str
    code_version: str
    libraries: Mapping[str, str] = field(default_factory=dict)

    def canonical(self) -> str:
        content: dict[str, Any] = {
            "model_fingerprint": self.model_fingerprint,
            "analysis": self.analysis,
            "params": dict(self.params),
            "data_hash": self.data_hash,
            "code_version": self.code_version,
        }
        if self.libraries:
            content["libraries"] = dict(self.libraries)
        return canonical_json(content)

    @functools.cached_property
    def run_id(self) -> str:
        """``sha256(canonical())[:16]``, computed once per key (a key is immutable)."""
        return sha256_hex(self.canonical())[:16]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "analysis": self.analysis,
            "params": dict(self.params),
            "task": self.task,
            "data_hash": self.data_hash,
            "code_version": self.code_version,
            "libraries": dict(self.libraries),
        }


HEAD_TABLE_COLUMNS: tuple[str, ...] = (
    "model",
    "run_id",
    "analysis",
    "metric",
    "layer",
    "head",
    "value",
)
"""The tidy per-head schema every per-head result is stored in (plus optional stderr, n, ...)."""


def heads_from(pairs: Sequence[tuple[int, int]]) -> frozenset[Head]:
    return frozenset(Head(int(layer), int(head)) for layer, head in pairs)


@dataclass(eq=False)
class NeedleSample:
    """One needle-in-a-haystack sample (Wu et al. 2024).

    ``context`` is ``Int[Tensor, "pos"]``: the whole prompt (BOS if any, haystack with the needle
    inserted, the question, and the chat template where the model has one) ending right before
    the answer. ``needle_span`` is the half-open token range ``[start, end)`` of the needle inside
    ``context``; ``answer`` is ``Int[Tensor, "ans"]``: the tokens of ``real_needle`` as the
    model should generate them.
    """

    context: torch.Tensor
    needle_span: tuple[int, int]
    answer: torch.Tensor
    needle: str
    question: str
    real_needle: str
    depth_percent: float
    context_length: int
    haystack: str = ""


@dataclass(eq=False)
class NeedleSet:
    """Needle samples over a grid of context lengths and depths, with a content hash."""

    task: str
    samples: tuple[NeedleSample, ...]
    prepend_bos: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.samples)

    def content_hash(self) -> str:
        import numpy as np

        parts: list[str | bytes] = [self.task, str(self.prepend_bos)]
        for s in self.samples:
            parts += [
                np.ascontiguousarray(s.context.cpu().numpy().astype("int64")).tobytes(),
                str(s.needle_span),
                np.ascontiguousarray(s.answer.cpu().numpy().astype("int64")).tobytes(),
            ]
        return sha256_hex(*parts)

    def to(self, device: str) -> NeedleSet:
        """The same samples with their tensors on ``device`` (itself when already there)."""
        if all(str(s.context.device) == str(device) for s in self.samples):
            return self
        from dataclasses import replace

        samples = tuple(
            replace(s, context=s.context.to(device), answer=s.answer.to(device))
            for s in self.samples
        )
        return replace(self, samples=samples)

    def __repr__(self) -> str:
        return f"NeedleSet(task={self.task!r}, n={self.n}, prepend_bos={self.prepend_bos})"


@dataclass(eq=False)
class HeadMetric:
    """One per-head metric: ``mean`` and optional ``stderr`` as ``[n_layers, n_heads]`` arrays
    (numpy), and ``n``, the number of samples each mean is over."""

    mean: Any
    stderr: Any | None = None
    n: int = 1


@dataclass(eq=False)
class AnalysisOutput:
    """What an analysis function returns: per-head metrics, other tidy tables (e.g. a layer x
    position grid in long form) and facts for the run manifest. The runner turns it into
    stored tables; the analysis never sees a run id or the store."""

    head_metrics: dict[str, HeadMetric] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, order=True)
class MLP:
    """The MLP of one layer, ``MLP(layer)``: a circuit component besides heads."""

    layer: int

    def __str__(self) -> str:
        return f"MLP{self.layer}"


@dataclass(frozen=True)
class Edge:
    """A directed edge ``sender -> receiver`` between two components (e.g. a path-patching path;
    ``via`` names the receiver input: ``"q"``, ``"k"``, ``"v"`` or ``""``)."""

    sender: Head | MLP
    receiver: Head | MLP
    via: str = ""

    def __str__(self) -> str:
        return f"{self.sender}->{self.receiver}{'.' + self.via if self.via else ''}"


Component = Head | MLP | Edge


def component_sort_key(c: Component) -> tuple[Any, ...]:
    """A total order over mixed components: heads, then MLPs, then edges."""
    if isinstance(c, Head):
        return (0, c.layer, c.head)
    if isinstance(c, MLP):
        return (1, c.layer, 0)
    return (2, component_sort_key(c.sender), component_sort_key(c.receiver), c.via)


@dataclass(frozen=True)
class Derivation:
    """How a circuit was obtained: the source run (and its analysis, metric, task), the rule
    (``top_k``, ``threshold``, ``top_share``, ``minimal_faithful``, ``union``, ``manual``) and the
    rule's parameters as canonical JSON (so the derivation stays hashable)."""

    rule: str
    params_json: str = "{}"
    source_run: str = ""
    analysis: str = ""
    metric: str = ""
    task: str = ""

    @property
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.params_json)
        return out


@dataclass(frozen=True)
class Circuit:
    """A circuit: a frozen set of components of one model, with roles and its derivation.

    Hashable, so circuits are set elements and overlap is set arithmetic. ``roles`` is a sorted
    tuple of ``(component, role)`` pairs (build circuits with :meth:`of` to pass a dict);
    ``grid`` is the model's ``(n_layers, n_heads)``; ``faithfulness`` is the measured
    ``(M(circuit only) - M(all ablated)) / (M(full) - M(all ablated))`` or None if not measured.
    """

    model: str
    components: frozenset[Component]
    derivation: Derivation
    grid: tuple[int, int]
    roles: tuple[tuple[Component, str], ...] = ()
    faithfulness: float | None = None

    @classmethod
    def of(
        cls,
        model: str,
        components: Sequence[Component] | frozenset[Component] | set[Component],
        derivation: Derivation,
        grid: tuple[int, int],
        roles: Mapping[Component, str] | None = None,
        faithfulness: float | None = None,
    ) -> Circuit:
        pairs = sorted((roles or {}).items(), key=lambda kv: component_sort_key(kv[0]))
        return cls(
            model, frozenset(components), derivation, (int(grid[0]), int(grid[1])),
            tuple(pairs), faithfulness,
        )  # fmt: skip

    @property
    def heads(self) -> frozenset[Head]:
        return frozenset(c for c in self.components if isinstance(c, Head))

    @property
    def role_map(self) -> dict[Component, str]:
        return dict(self.roles)

    @property
    def n_total_heads(self) -> int:
        return self.grid[0] * self.grid[1]

    def sorted_components(self) -> list[Component]:
        return sorted(self.components, key=component_sort_key)

    def __len__(self) -> int:
        return len(self.components)

    def __str__(self) -> str:
        shown = ", ".join(str(c) for c in self.sorted_components()[:12])
        more = f", ... (+{len(self) - 12})" if len(self) > 12 else ""
        faith = "" if self.faithfulness is None else f", faithfulness {self.faithfulness:.3f}"
        rule = self.derivation.rule
        return f"Circuit({self.model}, {len(self)} components: {shown}{more}; {rule}{faith})"
