"""Edge scores and circuits in the layouts of the field's tools, out and back in.

**EAP-IG graph JSON** (Hanna et al.'s ``eap`` package, ``Graph.to_json`` / ``Graph.from_json``,
the MIB circuit track's format)::

    {"cfg": {"n_layers", "n_heads", "parallel_attn_mlp": false, "d_model", ...},
     "nodes": {"input" | "a{l}.h{h}" | "m{l}" | "logits": {"in_graph": bool}},
     "edges": {"a0.h1->a1.h3<q>" | "input->m0" | "m1->logits": {"score": float, "in_graph": bool}}}

Senders ``embed`` / ``L{l}H{h}`` / ``L{l}.mlp`` are ``input`` / ``a{l}.h{h}`` / ``m{l}``; an edge
into a head names the head and its input, ``u->a{l}.h{h}<q|k|v>``. EAP-IG ungroups grouped-query
attention: it has ``k`` and ``v`` inputs per *query* head, this graph per *KV* head. Export: the
edge ``u->L{l}KV{g}.k`` (``.v``) becomes ``u->a{l}.h{h}<k>`` (``<v>``) for every query head ``h``
of group ``g`` (``h // (n_heads // n_kv_heads) == g``), each copy carrying the KV head's score;
``cfg`` gains ``"kv_grouped": true`` and ``n_kv_heads`` (eap ignores extra keys) and ``d_model``
is 0 where unknown (eap's ``from_json`` reads it only to size neuron masks). Import requires the
copies of one KV edge to be equal (else the file came from an ungrouped run: pass ``reduce`` =
``"sum"``, ``"mean"`` or ``"max_abs"`` to combine the per-query-head scores; ``"sum"`` is what
EAP and EAP-IG give the shared input, whose gradient is the sum of its copies'; a file flagged
``kv_grouped`` is never reduced). A circuit sets ``in_graph`` on its edges and on every node such
an edge touches (``logits`` always, as eap's ``LogitNode``); an edge is in the imported circuit
if any copy is. Edges come in eap's ``from_model`` order; unscored ones carry ``NaN``.

**auto-circuit PruneScores** (``Dict[module_name, Tensor]`` keyed by the destination module)::

    {"format": "auto-circuit PruneScores", "cfg": {"n_layers", "n_heads", "n_kv_heads"},
     "prune_scores": {module: nested lists}, "src_nodes": {module: [src names]}, "meta": {...}}

Modules, as auto-circuit's factorized TransformerLens graph names them: ``blocks.{l}.hook_q_input``
``[n_heads, n_src]``, ``blocks.{l}.hook_k_input`` / ``hook_v_input`` ``[n_kv_heads, n_src]`` (one
row per KV head, as the bridge's split K/V inputs have; auto-circuit itself enumerates K/V
destinations per query head), ``blocks.{l}.hook_mlp_in`` ``[n_src]`` and
``blocks.{L-1}.hook_resid_post`` ``[n_src]`` (the logits); as in auto-circuit a module with a
single destination has no head axis. The src axis is the senders in graph order
(auto-circuit's src ``idx`` order) up to the last one the module reads; ``src_nodes`` names them
auto-circuit's way (``Resid Start``, ``A{l}.{h}``, ``MLP {l}``). ``NaN`` marks an unscored edge.
``{k: torch.tensor(v) for k, v in d["prune_scores"].items()}`` is a ``PruneScores``.

Files are Python's JSON dialect (``NaN`` allowed, as eap's own ``to_json`` writes).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.edges.graph import EdgeGraph, GraphEdge, Receiver, ReceiverKind, Sender, resolve
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.edges.common import EdgeScores

REDUCE = ("sum", "mean", "max_abs")
_QKV: tuple[ReceiverKind, ...] = ("q", "k", "v")
_EAP_NODE = re.compile(r"input|logits|a(\d+)\.h(\d+)|m(\d+)")
_EAP_FORM = "name edges like 'input->a0.h1<q>', 'a0.h1->m1' or 'm1->logits'"


def _group(graph: EdgeGraph) -> int:
    return graph.n_heads // graph.n_kv_heads


def _full(scores: EdgeScores) -> np.ndarray:
    """Mean score per graph edge, ``NaN`` where unscored."""
    full = np.full(len(scores.graph), np.nan)
    full[np.asarray(scores.edges, dtype=np.int64)] = scores.scores
    return full


def _meta(scores: EdgeScores) -> dict[str, Any]:
    n = int(scores.per_prompt.shape[0])
    return {"source": "workbench", "method": scores.method, "metric": scores.metric, "n_prompts": n}


# ---------------------------------------------------------------- EAP-IG


def _eap_sender(s: Sender) -> str:
    if s.kind == "embed":
        return "input"
    return f"a{s.layer}.h{s.head}" if s.kind == "head" else f"m{s.layer}"


def _eap_nodes(graph: EdgeGraph) -> list[str]:
    return [_eap_sender(s) for s in graph.senders] + ["logits"]


def _eap_edges(graph: EdgeGraph) -> list[tuple[str, int]]:
    """Every EAP-IG edge name with the position of the edge of ``graph`` it copies, in the order
    eap's ``Graph.from_model`` adds them (per layer: q/k/v of every head, sender-major; the MLP;
    finally the logits)."""
    pos = {e: i for i, e in enumerate(graph.edges)}
    out: list[tuple[str, int]] = []

    def add(s: Sender, receiver: Receiver, child: str) -> None:
        out.append((f"{_eap_sender(s)}->{child}", pos[GraphEdge(s, receiver)]))

    for layer in range(graph.n_layers):
        for s in graph.senders:
            if Receiver("q", layer, 0).reads(s):
                for h in range(graph.n_heads):
                    for kind in _QKV:
                        head = h if kind == "q" else h // _group(graph)
                        add(s, Receiver(kind, layer, head), f"a{layer}.h{h}<{kind}>")
        for s in graph.senders:
            if Receiver("mlp", layer).reads(s):
                add(s, Receiver("mlp", layer), f"m{layer}")
    for s in graph.senders:
        add(s, Receiver("logits"), "logits")
    return out


def to_eap_ig_json(
    scores: EdgeScores, circuit: Iterable[str] | None = None, *, d_model: int | None = None
) -> dict[str, Any]:
    """``scores`` (and ``circuit``, our edge names, as ``in_graph``) as eap's ``Graph.to_json``
    dict, K/V edges copied per query head (module docstring)."""
    graph = scores.graph
    full = _full(scores)
    chosen = np.zeros(len(graph), dtype=bool)
    if circuit is not None:
        chosen[resolve(graph, [circuit] if isinstance(circuit, str) else circuit)] = True
    edges: dict[str, dict[str, Any]] = {}
    touched = {"logits"}
    for name, e in _eap_edges(graph):
        edges[name] = {"score": float(full[e]), "in_graph": bool(chosen[e])}
        if chosen[e]:
            parent, _, child = name.partition("->")
            touched.update((parent, child.split("<")[0]))
    cfg = {
        "n_layers": graph.n_layers,
        "n_heads": graph.n_heads,
        "parallel_attn_mlp": False,
        "d_model": int(d_model if d_model is not None else scores.info.get("d_model", 0)),
        "n_kv_heads": graph.n_kv_heads,
        "kv_grouped": True,
    }
    nodes = {n: {"in_graph": n in touched} for n in _eap_nodes(graph)}
    return {"cfg": cfg, "nodes": nodes, "edges": edges, "meta": _meta(scores)}


def _shape(graph: EdgeGraph) -> str:
    return f"{graph.n_layers} layers x {graph.n_heads} heads ({graph.n_kv_heads} KV heads)"


def _eap_node_error(graph: EdgeGraph, node: str, where: str) -> WorkbenchError | None:
    m = _EAP_NODE.fullmatch(node)
    if m is None:
        return WorkbenchError(f"unknown EAP-IG node {node!r}{where}", _EAP_FORM)
    layer = int(m.group(1) or m.group(3) or 0)
    if layer >= graph.n_layers or int(m.group(2) or 0) >= graph.n_heads:
        return WorkbenchError(
            f"EAP-IG node {node!r}{where} is not in this graph",
            f"this graph has {_shape(graph)}; import the file into the model it came from",
        )
    return None


def _eap_edge_error(graph: EdgeGraph, name: str) -> WorkbenchError:
    """Why ``name`` is not an EAP-IG edge of ``graph``, in one line."""
    parent, sep, child = name.partition("->")
    m = re.fullmatch(r"(.*?)(?:<([qkv])>)?", child)
    node, qkv = (m.group(1), m.group(2)) if m else (child, None)
    forms = _EAP_NODE.fullmatch(parent) and _EAP_NODE.fullmatch(node)
    if not (sep and forms) or parent == "logits" or node == "input":
        return WorkbenchError(f"unknown EAP-IG edge name {name!r}", _EAP_FORM)
    if (qkv is None) == node.startswith("a"):
        return WorkbenchError(
            f"unknown EAP-IG edge name {name!r}", "only edges into heads end in <q>, <k> or <v>"
        )
    for n in (parent, node):
        err = _eap_node_error(graph, n, f" in edge {name!r}")
        if err is not None:
            return err
    return WorkbenchError(
        f"EAP-IG edge {name!r} runs backwards: its receiver reads before its sender writes",
        "a receiver must sit in a later layer than its sender (an MLP also reads the heads of "
        "its own layer)",
    )


def _malformed(what: str) -> WorkbenchError:
    return WorkbenchError(
        f"malformed EAP-IG graph JSON: {what}",
        "give the dict eap's Graph.to_json writes: {'cfg', 'nodes', 'edges': {name: "
        "{'score', 'in_graph'}}}",
    )


def _eap_cfg(data: Any, graph: EdgeGraph) -> bool:
    """Validate the file's structure and shape against ``graph``; whether it is ``kv_grouped``."""
    if not isinstance(data, Mapping):
        raise _malformed(f"a {type(data).__name__}, not an object")
    for key in ("cfg", "nodes", "edges"):
        if not isinstance(data.get(key), Mapping):
            raise _malformed(f"no {key!r} object")
    cfg = data["cfg"]
    layers, heads = cfg.get("n_layers"), cfg.get("n_heads")
    if not isinstance(layers, int) or not isinstance(heads, int):
        raise _malformed("cfg lacks integer 'n_layers' and 'n_heads'")
    grouped = bool(cfg.get("kv_grouped", False))
    kv = cfg.get("n_kv_heads", graph.n_kv_heads) if grouped else graph.n_kv_heads
    if (layers, heads, kv) != (graph.n_layers, graph.n_heads, graph.n_kv_heads):
        raise WorkbenchError(
            f"the EAP-IG file is for {layers} layers x {heads} heads ({kv} KV heads); "
            f"this graph has {_shape(graph)}",
            "import it into the model it was written from",
        )
    if cfg.get("parallel_attn_mlp"):
        raise WorkbenchError(
            "the EAP-IG file is for a parallel attention/MLP model",
            "the edge graph assumes sequential blocks; import it into the model it came from",
        )
    return grouped


def _combine(
    graph: EdgeGraph, pos: int, values: list[float], grouped: bool, reduce: str | None
) -> float:
    """One score from the copies of an edge (several only for K/V edges)."""
    v = np.asarray(values)
    if len(v) > 1 and (grouped or reduce is None):
        same = (v == v[0]) | (np.isnan(v) & np.isnan(v[0]))
        if not same.all():
            edge, first, other = str(graph.edges[pos]), float(v[0]), float(v[~same][0])
            if grouped:
                raise WorkbenchError(
                    f"the EAP-IG file is flagged kv_grouped but the per-query-head copies of "
                    f"KV edge {edge!r} differ ({first:.6g} vs {other:.6g})",
                    "re-export it, or drop cfg.kv_grouped and pass reduce= to combine them",
                )
            raise WorkbenchError(
                f"the per-query-head copies of KV edge {edge!r} differ ({first:.6g} vs "
                f"{other:.6g}): the EAP-IG file was not written from a grouped graph",
                f"pass reduce='sum', 'mean' or 'max_abs' to combine the scores of the "
                f"{_group(graph)} query heads of each KV head",
            )
    if len(v) == 1 or grouped or reduce is None:
        return float(v[0])
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan")
    if reduce == "sum":
        return float(v.sum())
    return float(v.mean()) if reduce == "mean" else float(v[np.argmax(np.abs(v))])


def from_eap_ig_json(
    data: Mapping[str, Any], graph: EdgeGraph, *, reduce: str | None = None
) -> tuple[dict[str, float], frozenset[str]]:
    """Scores by our edge name (graph order; unscored ``NaN`` dropped) and the in-graph edges of
    an eap ``Graph.to_json`` dict; ``reduce`` combines ungrouped K/V copies (module docstring)."""
    if reduce is not None and reduce not in REDUCE:
        raise WorkbenchError(f"unknown reduce {reduce!r}", f"choose from {', '.join(REDUCE)}")
    grouped = _eap_cfg(data, graph)
    known_nodes = set(_eap_nodes(graph))
    for node, info in data["nodes"].items():
        if node not in known_nodes:
            raise _eap_node_error(graph, str(node), "") or _malformed(f"node {node!r}")
        if not isinstance(info, Mapping):
            raise _malformed(f"node {node!r} is not an object")
    known = dict(_eap_edges(graph))
    values: dict[int, list[float]] = {}
    inside: set[int] = set()
    for name, info in data["edges"].items():
        pos = known.get(name)
        if pos is None:
            raise _eap_edge_error(graph, str(name))
        score = info.get("score") if isinstance(info, Mapping) else None
        flag = info.get("in_graph", False) if isinstance(info, Mapping) else None
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise _malformed(f"edge {name!r} has no numeric 'score'")
        if not isinstance(flag, bool):
            raise _malformed(f"edge {name!r} has a non-boolean 'in_graph'")
        values.setdefault(pos, []).append(float(score))
        if flag:
            inside.add(pos)
    out = {}
    for pos in sorted(values):
        value = _combine(graph, pos, values[pos], grouped, reduce)
        if not np.isnan(value):
            out[str(graph.edges[pos])] = value
    return out, frozenset(str(graph.edges[p]) for p in inside)


# ---------------------------------------------------------------- auto-circuit


def _ac_src(s: Sender) -> str:
    if s.kind == "embed":
        return "Resid Start"
    return f"A{s.layer}.{s.head}" if s.kind == "head" else f"MLP {s.layer}"


def _ac_module(graph: EdgeGraph, r: Receiver) -> str:
    """auto-circuit's module name of a receiver (HookedTransformer's names, not the bridge's:
    a name in that tool's file format, never a hook of ours)."""
    if r.kind == "logits":
        return f"blocks.{graph.n_layers - 1}.hook_resid_post"
    return f"blocks.{r.layer}.hook_{'mlp_in' if r.kind == 'mlp' else r.kind + '_input'}"


def _ac_modules(graph: EdgeGraph) -> dict[str, tuple[list[int], int]]:
    """Per destination module: the first edge position of each of its receivers (head order;
    a receiver's edges are contiguous, senders in order) and how many senders it reads."""
    out: dict[str, tuple[list[int], int]] = {}
    starts = np.searchsorted(graph.receiver_index, np.arange(len(graph.receivers)))
    for j, r in enumerate(graph.receivers):
        n_src = sum(r.reads(s) for s in graph.senders)
        out.setdefault(_ac_module(graph, r), ([], n_src))[0].append(int(starts[j]))
    return out


def to_auto_circuit(scores: EdgeScores) -> dict[str, Any]:
    """``scores`` as an auto-circuit ``PruneScores`` table (module docstring), JSON-ready."""
    graph = scores.graph
    full = _full(scores)
    names = [_ac_src(s) for s in graph.senders]
    table: dict[str, Any] = {}
    srcs: dict[str, list[str]] = {}
    for module, (starts, n) in _ac_modules(graph).items():
        block = np.stack([full[a : a + n] for a in starts])
        table[module] = (block if len(starts) > 1 else block[0]).tolist()
        srcs[module] = names[:n]
    cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "n_kv_heads": graph.n_kv_heads}
    return {
        "format": "auto-circuit PruneScores",
        "cfg": cfg,
        "prune_scores": table,
        "src_nodes": srcs,
        "meta": _meta(scores),
    }


def from_auto_circuit(data: Mapping[str, Any], graph: EdgeGraph) -> dict[str, float]:
    """Scores by our edge name (graph order, ``NaN`` dropped) from :func:`to_auto_circuit`'s dict
    or a bare ``{module: nested lists}`` table; modules may be missing."""
    fix = "give the dict to_auto_circuit writes: {'prune_scores': {module: nested lists}, ...}"
    if not isinstance(data, Mapping):
        raise WorkbenchError(f"malformed auto-circuit table: a {type(data).__name__}", fix)
    table, srcs, cfg = data.get("prune_scores", data), data.get("src_nodes", {}), data.get("cfg")
    if not isinstance(table, Mapping) or not isinstance(srcs, Mapping):
        raise WorkbenchError("malformed auto-circuit table: 'prune_scores' is not an object", fix)
    if isinstance(cfg, Mapping):
        shape = tuple(cfg.get(k) for k in ("n_layers", "n_heads", "n_kv_heads"))
        if shape != (graph.n_layers, graph.n_heads, graph.n_kv_heads):
            raise WorkbenchError(
                f"the auto-circuit table is for (layers, heads, KV heads) = {shape}; this graph "
                f"has {_shape(graph)}",
                "import it into the model it was written from",
            )
    modules = _ac_modules(graph)
    names = [_ac_src(s) for s in graph.senders]
    full = np.full(len(graph), np.nan)
    for module, value in table.items():
        if module not in modules:
            raise WorkbenchError(
                f"unknown auto-circuit module {module!r}",
                f"this graph ({_shape(graph)}) has blocks.{{l}}.hook_{{q,k,v}}_input, "
                f"blocks.{{l}}.hook_mlp_in and blocks.{graph.n_layers - 1}.hook_resid_post",
            )
        starts, n = modules[module]
        want = (len(starts), n) if len(starts) > 1 else (n,)
        try:
            arr = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            raise WorkbenchError(
                f"auto-circuit module {module!r} is not a numeric array", fix
            ) from None
        if arr.shape != want:
            raise WorkbenchError(
                f"auto-circuit module {module!r} has shape {list(arr.shape)}, not {list(want)}",
                "[dest heads, src nodes] with the src axis up to the last sender the module "
                "reads; a file for another model shape will not fit",
            )
        if module in srcs and list(srcs[module]) != names[:n]:
            raise WorkbenchError(
                f"auto-circuit module {module!r} lists other src_nodes than this graph's",
                f"its src axis must be {names[0]!r}, {names[1]!r}, ... {names[n - 1]!r}",
            )
        for a, row in zip(starts, arr.reshape(len(starts), n), strict=True):
            full[a : a + n] = row
    return {str(graph.edges[e]): float(full[e]) for e in np.flatnonzero(~np.isnan(full))}


# ---------------------------------------------------------------- files


def save_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as JSON atomically (a temp file in the same folder, then ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    return target


def load_json(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``; a one-line :class:`WorkbenchError` if unreadable or not JSON."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise WorkbenchError(f"cannot read {str(path)!r}: {e.strerror}", "check the path") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkbenchError(
            f"{str(path)!r} is not JSON ({e.msg} at line {e.lineno})",
            "give a file written by save_json or eap's Graph.to_json",
        ) from None
