"""The engine layer under the analyses: forward-time machinery several analyses share.

Analyses import from here (and the layers below: models, tasks, store, hooks, types); no
analysis imports another (``scripts/import_graph.py --check``, run by the test suite). This
package imports nothing on import, so the torch-free modules (``plan``, ``answers``,
``fallbacks``) stay torch-free.

- ``resume.py``: :class:`~workbench.forward.resume.ResumableRun`, a run resumed at any layer
  (and only for the positions a patch changes) from recorded block inputs: activation, path
  and edge patching, head sweeps;
- ``components.py``: what a patched component indexes (``Index``) and its masks;
- ``paths.py``: path patching through the resumed run (a sender's effect on the logits only);
- ``decode.py``: prefill with a shared-prefix KV cache, greedy (batched) decoding, attention
  argmax inside hooks; ``answers.py``: ROUGE-1 recall of an answer (Wu et al. 2024);
- ``head_sweep.py``: one batched forward per wave of head edits (zeroing, scaling, steering);
- ``interventions.py``: ablation context managers on chosen heads (zero, mean, resample);
- ``attention_edits.py``: ACT calibration, PASTA steering, sink sets;
- ``plan.py``: :class:`~workbench.forward.plan.KVPlan`, which KV heads keep their cache;
  ``streaming.py``: a model run under a plan (mask mode); ``eviction.py``: decoding with real
  eviction;
- ``unembed.py``: the final norm and unembedding written out (direct logit attribution, the
  logit lens, edge attribution to the logits);
- ``patterns.py``: detection patterns (previous-token, duplicate-token, induction);
- ``selfcheck.py``: the self-checks every fast path relies on (KV cache, resume, hooks), run
  once per model and library versions; ``fallbacks.py``: slower exact paths, printed once.
"""
