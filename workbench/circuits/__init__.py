"""Post-processing of stored per-head scores: circuits, overlap, agreement (torch-free but for
faithfulness).

- ``rules.py``: circuits by rule (top-k, threshold, top share) and their union;
- ``io.py``: circuits as JSON and in the results store;
- ``faithfulness.py``: a circuit's faithfulness and the minimal faithful circuit (needs a model);
- ``overlap.py`` and ``overlap_step.py``: overlap of circuits across tasks and models (Merullo
  et al. 2023), and the ``[overlap]`` step of a spec;
- ``agreement.py``: how far two per-head scorings agree (an estimate against its reference).

The statistics they use are in :mod:`workbench.stats`. The public names are re-exported here.
"""

from workbench.circuits.io import (
    CIRCUIT_ANALYSIS,
    circuit_from_dict,
    circuit_json,
    circuit_to_dict,
    load_circuit,
    save_circuit,
    sorted_heads,
)
from workbench.circuits.rules import RULES, derive_circuit, run_scores, select_heads, union

__all__ = [
    "CIRCUIT_ANALYSIS",
    "RULES",
    "circuit_from_dict",
    "circuit_json",
    "circuit_to_dict",
    "derive_circuit",
    "load_circuit",
    "run_scores",
    "save_circuit",
    "select_heads",
    "sorted_heads",
    "union",
]
