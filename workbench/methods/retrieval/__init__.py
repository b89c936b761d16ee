"""Retrieval heads (Wu et al. 2024): faithful (greedy decoding) and fast (teacher-forced) scoring.

Importing the package imports no torch: ``schemas`` and ``rouge`` are torch-free; the scoring
modules (``decode``, ``faithful``, ``fast``, ``analysis``) are imported by the registry on use.
"""
