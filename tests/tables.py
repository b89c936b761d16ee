"""Comparing result tables that were computed in different processes."""

from __future__ import annotations

import pandas as pd

RTOL, ATOL = 1e-5, 1e-6


def assert_same_rows(got: pd.DataFrame | pd.Series, want: pd.DataFrame | pd.Series) -> None:
    """Same index, columns, dtypes and non-float values exactly; float values within
    ``|got - want| <= ATOL + RTOL |want|``. Another process (a worker, a Ray actor) runs the same
    computation, but its matrix kernels may sum in another order (thread count, buffer
    alignment), which moves float32 results in the last bits."""
    if isinstance(want, pd.Series):
        pd.testing.assert_series_equal(got, want, check_exact=False, rtol=RTOL, atol=ATOL)
    else:
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=RTOL, atol=ATOL)
