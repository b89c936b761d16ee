"""Self-checks of the library internals the fast paths rely on, once per model and version set.

Upstream releases change internals without notice (transformers 5.24 made TransformerLens's
cached decoding silently wrong). So every fast path asks :func:`require` for the checks it
depends on before it computes anything; each check runs once per (model fingerprint, library
versions) in a process, and its outcome is also written to
``$WORKBENCH_HOME/selfchecks/<fingerprint>.json`` so a stored result computed under a version
set that failed is never served (:func:`failed_for`).

Checks (each compares a fast path with a full forward of the same tokens, on a tiny slice):

- ``hooks`` (every analysis, run by the runner): each hook kind of :mod:`workbench.hooks`
  exists on the bridge, fires, and has its documented shape (GQA: ``k`` / ``v`` per KV head);
  pattern rows sum to one.
- ``kv_cache``: HF KV-cache decoding through the bridge (retrieval heads' prefill, shared
  prefix copy, greedy decoding; causal validation): prefill 6 tokens, copy the cache, extend by
  2, then 4 single-token steps; and the batched decoder's cache handling (stacked caches, a
  multi-token verifying forward, cropping, selecting rows). Every step's logits equal the full
  forward's to ``TOL * max(1, max |logit|)``. No exact fallback exists, so a failure is an
  error.
- ``resume``: the patching engine's resumed runs (``ResumableRun``: blocks called with the
  arguments recorded in the base run, hooks by name): a resume at the middle layer, the last
  block for the final query only, and the suffix-only resume behind the base run's keys and
  values all equal the base run's logits. The last two have exact slower fallbacks: where the
  model never calls the cache they stand in for, the fallback is recorded (``facts``) and
  printed once; where they run but disagree, it is an error.

A failure is one :class:`WorkbenchError` line naming the versions found, the versions in the
lock and the fix, raised before anything is computed or stored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.forward import fallbacks
from workbench.home import workbench_home
from workbench.provenance import library_versions, locked_versions, versions_text

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel

log = logging.getLogger(__name__)

CHECKS_VERSION = "1"
"""Bump when a check changes: earlier records are then ignored."""

TOL = 1e-4
"""Relative tolerance: ``max |fast - full| <= TOL * max(1, max |full logit|)``."""

Facts = dict[str, str]

_lock = threading.Lock()
_memo: dict[tuple[str, str], Facts] = {}


class SelfCheckFailed(WorkbenchError):
    """A fast path's reliance on library internals does not hold in this environment;
    ``detail`` says what differed (without the versions, which the message adds)."""

    detail: str = ""


def versions_key(versions: dict[str, str] | None = None) -> str:
    """Key of a version set, with the checks' version and whether the workarounds of
    :mod:`workbench.models.compat` are on (they change the outcome at equal versions)."""
    from workbench.models.compat import enabled

    v = library_versions() if versions is None else versions
    state = {**v, "checks": CHECKS_VERSION, "compat": "on" if enabled() else "off"}
    text = json.dumps(state, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record_path(fingerprint: str) -> Path:
    safe = hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
    return workbench_home() / "selfchecks" / f"{safe}.json"


def _read_records(fingerprint: str) -> dict[str, Any]:
    try:
        data = json.loads(_record_path(fingerprint).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(fingerprint: str, check: str, ok: bool, detail: str) -> None:
    """Atomic (temp file + rename); a lost race only loses an equivalent record."""
    path = _record_path(fingerprint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_records(fingerprint)
        entry = data.setdefault(versions_key(), {"versions": library_versions(), "checks": {}})
        entry["checks"][check] = {"ok": ok, "detail": detail}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop the check itself
        log.warning("could not record self-check %s: %s", check, e)


def failed_for(fingerprint: str, versions: dict[str, str], checks: tuple[str, ...]) -> str | None:
    """The detail of a recorded failure of one of ``checks`` for this model and version set
    (``versions``: as in :func:`workbench.provenance.library_versions`), else None. Torch-free:
    the runner asks it before serving a stored result."""
    entry = _read_records(fingerprint).get(versions_key(versions))
    if not isinstance(entry, dict):
        return None
    for name, rec in (entry.get("checks") or {}).items():
        if name in checks and isinstance(rec, dict) and rec.get("ok") is False:
            return str(rec.get("detail"))
    return None


def trusted(fingerprint: str, key_libraries: dict[str, str], checks: tuple[str, ...]) -> bool:
    """False when one of ``checks`` is recorded as failed for this model under these versions
    (``key_libraries``: a run key's ``libraries``): a stored result is then not served, and
    the runner computes instead, which re-runs the check first (it raises again, or passes
    and replaces the record)."""
    from workbench import __version__

    versions = {**key_libraries, "workbench": str(__version__)}
    return not checks or failed_for(fingerprint, versions, checks) is None


def _failure(model: LoadedModel, check: str, detail: str) -> SelfCheckFailed:
    found = library_versions()
    locked = locked_versions()
    lock_text = versions_text(locked) if locked else "no lock file in this install"
    what = f"self-check '{check}' failed on {model.name}: {detail}"
    err = SelfCheckFailed(
        f"{what}; found {versions_text(found)}; the lock has {lock_text}",
        "reinstall the locked versions (make setup, or pip install --no-deps -r "
        "requirements.lock) or report the new upstream release",
    )
    err.detail = what
    return err


def _scale_diff(fast: Any, full: Any, dtype: str = "float32") -> tuple[float, float]:
    """``max |fast - full|`` and its bound ``tol * max(1, max |full|)``, ``tol`` the dtype's
    (``TOL`` for float32; ``workbench.models.precision.TOLERANCE``)."""
    from workbench.models.precision import TOLERANCE

    diff = float((fast.double() - full.double()).abs().max())
    return diff, TOLERANCE.get(dtype, TOL) * max(1.0, float(full.abs().max()))


def _tokens(model: LoadedModel, rows: int, length: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    vocab = int(model.cfg.d_vocab)
    ids = torch.randint(min(10, vocab - 1), vocab, (rows, length), generator=gen)
    return ids.to(model.device)


def check_kv_cache(model: LoadedModel) -> Facts:
    """Cached decoding equals the full forward (module doc), one sequence and batched."""
    import torch

    from workbench.forward.decode import forward_step

    ids = _tokens(model, 1, 12)[0]
    with torch.no_grad():
        full = model.bridge(ids[None], prepend_bos=False)[0]
        _, cache = forward_step(model, ids[:6], None)
        cache = copy.deepcopy(cache)
        out, cache = forward_step(model, ids[6:8], cache, keep=2)
        worst, tol = _scale_diff(out, full[6:8], model.dtype)
        for t in range(8, 12):
            out, cache = forward_step(model, ids[t : t + 1], cache)
            d, _ = _scale_diff(out[-1], full[t], model.dtype)
            worst = max(worst, d)
        if worst <= tol:  # the batched path only where the plain one holds
            try:
                worst = max(worst, _batched_decoding_diff(model))
            except (AttributeError, RuntimeError, TypeError, ValueError) as e:
                detail = f"the batched decoder's cache handling fails: {type(e).__name__}: {e}"
                raise _failure(model, "kv_cache", detail.splitlines()[0]) from e
    if not worst <= tol:
        raise _failure(
            model,
            "kv_cache",
            f"decoding with the KV cache differs from a full forward by {worst:.3g} "
            f"(tolerance {tol:.2g})",
        )
    return {"kv_cache": f"ok (max |diff| {worst:.2g})"}


def _batched_decoding_diff(model: LoadedModel) -> float:
    """The batched decoder's cache handling (``retrieval.decode.decode_batch``): caches of two
    sequences prefilled apart and stacked, a 3-token verifying forward, the cache cropped back
    to its first token where every layer allows it, then one sequence's row selected and one
    more step; the largest difference from the full forwards."""
    from workbench.forward.decode import (
        _crop,
        _plain_layer,
        _select,
        forward_batch,
        forward_step,
        stack_caches,
    )

    ids = _tokens(model, 2, 13)
    full = model.bridge(ids, prepend_bos=False)
    cache = stack_caches([forward_step(model, ids[j, :8], None)[1] for j in range(2)])
    out, cache = forward_batch(model, ids[:, 8:11], cache, keep=3)
    worst = _scale_diff(out, full[:, 8:11], model.dtype)[0]
    t = 11
    if all(_plain_layer(layer) for layer in getattr(cache, "layers", [None])):
        _crop(cache, 9)
        t = 9
    out, cache = forward_batch(model, ids[:, t : t + 1], cache)
    worst = max(worst, _scale_diff(out[:, -1], full[:, t], model.dtype)[0])
    cache = _select(cache, [1], 2)
    out, _ = forward_batch(model, ids[1:2, t + 1 : t + 2], cache)
    return max(worst, _scale_diff(out[0, -1], full[1, t + 1], model.dtype)[0])


def check_resume(model: LoadedModel) -> Facts:
    """Resumed runs of the patching engine equal the base run (module doc)."""
    import torch

    from workbench.forward.resume import ResumableRun

    # Within any sliding window: a window shorter than the prompt is a legitimate fallback of
    # real prompts (recorded by the sweep), not a property of the library.
    hf = getattr(getattr(model.bridge, "_driver", None), "underlying_model", None)
    window = getattr(getattr(hf, "config", None), "sliding_window", None)
    length = min(10, int(window) - 2) if isinstance(window, int) and window >= 6 else 10
    tokens = _tokens(model, 2, length)
    run = ResumableRun(model, tokens)
    full, mid, start = run.final_logits, model.n_layers // 2, length // 2
    facts: Facts = {}
    with torch.inference_mode():
        d, tol = _scale_diff(run.run_wave({mid: run.resid(mid)}), full, model.dtype)
        if not d <= tol:
            raise _failure(
                model, "resume", f"a run resumed at layer {mid} differs from the full forward by "
                f"{d:.3g} (tolerance {tol:.2g})"
            )  # fmt: skip
        out = run.run_wave({0: run.resid(0)}, last_query_only=True)
        if not run.last_query_ok:
            facts["last_query"] = "fallback: the last block runs whole (the model never "
            facts["last_query"] += "called the cache that captures its keys and values)"
        else:
            d, _ = _scale_diff(out, full, model.dtype)
            if not d <= tol:
                raise _failure(model, "resume", f"the last-query block differs by {d:.3g}")
            facts["last_query"] = "ok"
        prefix = run.prefix_kv(start)
        if prefix is None:
            facts["suffix_resume"] = "fallback: all positions are recomputed (the base run's "
            facts["suffix_resume"] += "HF cache holds no usable keys and values)"
        else:
            out = run.run_wave({mid: run.resid(mid)[:, start:]}, start=start, prefix=prefix)
            d, _ = _scale_diff(out, full, model.dtype)
            if not d <= tol:
                raise _failure(
                    model, "resume", f"the suffix-only resume differs from the full forward by "
                    f"{d:.3g} (its prefix keys and values were not used?)"
                )  # fmt: skip
            facts["suffix_resume"] = "ok"
    return facts


def check_hooks(model: LoadedModel) -> Facts:
    """The bridge's hook layout (``workbench.hooks``): every hook kind exists, fires, and has
    the documented shape; attention patterns are distributions over keys."""
    import torch

    from workbench.hooks import HOOK_KINDS, hook_name

    tokens = _tokens(model, 2, 6)
    b, p = tokens.shape
    d_model, n_h, n_kv = int(model.cfg.d_model), model.n_heads, model.n_kv_heads
    d_head = int(model.cfg.d_head)
    want = {
        "q": (b, p, n_h, d_head), "k": (b, p, n_kv, d_head), "v": (b, p, n_kv, d_head),
        "z": (b, p, n_h, d_head), "pattern": (b, n_h, p, p), "scores": (b, n_h, p, p),
        "rot_q": (b, p, n_h, d_head), "rot_k": (b, p, n_kv, d_head),
    }  # fmt: skip
    rotary = hook_name("rot_q", 0) in model.bridge.hook_dict  # absent without RoPE (GPT-2)
    names = {
        kind: hook_name(kind, 0) for kind in HOOK_KINDS if rotary or kind not in ("rot_q", "rot_k")
    }
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(
            tokens, prepend_bos=False, names_filter=lambda n: n in names.values()
        )
    for kind, name in names.items():
        shape = want.get(kind, (b, p, d_model))
        got = tuple(cache[name].shape) if name in cache else None
        if got != shape:
            raise _failure(
                model, "hooks", f"hook {name} gave shape {got}, the workbench expects {shape}"
            )
    from workbench.models.precision import TOLERANCE

    rows = cache[names["pattern"]].double().sum(-1)
    if not torch.allclose(rows, torch.ones_like(rows), atol=TOLERANCE[model.dtype]):
        raise _failure(model, "hooks", f"{names['pattern']} rows do not sum to one")
    return {"hooks": "ok"}


CHECKS: dict[str, Callable[[LoadedModel], Facts]] = {
    "hooks": check_hooks,
    "kv_cache": check_kv_cache,
    "resume": check_resume,
}


def require(model: LoadedModel, *checks: str) -> Facts:
    """Run each named check once per (model fingerprint, library versions); raise
    :class:`SelfCheckFailed` on a failure, print each fallback once, and return the facts
    (for the run's info). ``WORKBENCH_SELFCHECK=off`` skips them (never in tests)."""
    facts: Facts = {}
    if os.environ.get("WORKBENCH_SELFCHECK", "on").strip().lower() in ("off", "0", "false"):
        return {"selfcheck": "skipped (WORKBENCH_SELFCHECK=off)"}
    vkey = versions_key()
    for name in checks:
        memo_key = (f"{model.fingerprint}|{name}", vkey)
        with _lock:
            known = _memo.get(memo_key)
        if known is not None and failed_for(model.fingerprint, library_versions(), (name,)):
            known = None  # another process found it failing since: check again
        if known is None:
            try:
                known = CHECKS[name](model)
            except SelfCheckFailed as e:
                _write_record(model.fingerprint, name, False, e.detail or e.problem)
                raise
            _write_record(model.fingerprint, name, True, json.dumps(known))
            with _lock:
                _memo[memo_key] = known
        facts.update(known)
    for what, text in facts.items():
        if text.startswith("fallback"):
            fallbacks.note(model, what, text)
    return facts


def clear_memo() -> None:
    """Forget in-process outcomes (tests)."""
    with _lock:
        _memo.clear()
    fallbacks.clear()
