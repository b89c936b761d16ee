"""Runs as jobs: a job table per results store, workers that own their models, a local pool.

- ``queue.py``: :class:`JobQueue`, the job table (queued / running / done / failed / cancelled,
  progress, worker, heartbeat), idempotent by run id;
- ``worker.py``: :func:`work`, the worker loop behind ``workbench worker``;
- ``pool.py``: :func:`run_on_workers`, a spec's parts on ``N`` local workers
  (``workbench run SPEC --workers N``).
"""
