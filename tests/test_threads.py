"""In-process safety: threads sharing one loaded model (as the app's sessions and notebooks do)
serialise on the model's lock, so their results equal the sequential ones."""

from __future__ import annotations

import threading

import numpy as np

from workbench.attention import attention_map
from workbench.hooks import model_lock
from workbench.runner import run_analysis

IOI = {"n_prompts": 4}
IND = {"seq_len": 10, "n_prompts": 4}


def _both(model, store):
    det = run_analysis("head_detectors", model, "induction", task_params=IND, store=store)
    patch = run_analysis("activation_patching", model, "ioi", task_params=IOI, store=store)
    return det.heads, patch.heads


def test_two_threads_on_one_model_equal_the_sequential_results(load, tmp_path):
    from workbench.store import ResultStore

    model = load("tiny-llama")
    det_seq, patch_seq = _both(model, ResultStore(tmp_path / "sequential"))
    maps_seq = attention_map(model, "When Mary and John went", 1)

    out: dict[str, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def run(name, fn):
        try:
            barrier.wait()
            out[name] = fn()
        except BaseException as e:
            errors.append(e)

    stores = [ResultStore(tmp_path / f"thread{i}") for i in range(2)]
    threads = [
        threading.Thread(target=run, args=("a", lambda: _both(model, stores[0]))),
        threading.Thread(target=run, args=("b", lambda: _both(model, stores[1])[::-1])),
        threading.Thread(
            target=run, args=("maps", lambda: attention_map(model, "When Mary and John went", 1))
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    det_a, patch_a = out["a"]
    patch_b, det_b = out["b"]
    for got in (det_a, det_b):
        np.testing.assert_array_equal(got["value"].to_numpy(), det_seq["value"].to_numpy())
    for got in (patch_a, patch_b):
        np.testing.assert_allclose(
            got["value"].to_numpy(), patch_seq["value"].to_numpy(), atol=1e-6
        )
    np.testing.assert_array_equal(np.asarray(out["maps"].pattern), np.asarray(maps_seq.pattern))


def test_the_model_lock_is_one_reentrant_lock_per_model(load):
    model = load("tiny-llama")
    assert model_lock(model.bridge) is model_lock(model.bridge)
    with model_lock(model.bridge), model_lock(model.bridge):  # re-entrant in one thread
        pass
    held = threading.Event()
    release = threading.Event()

    def hold():
        with model_lock(model.bridge):
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    assert not model_lock(model.bridge).acquire(timeout=0.05)  # another thread waits
    release.set()
    t.join()
    assert model_lock(model.bridge).acquire(timeout=1)
    model_lock(model.bridge).release()
