"""The one summary of a list of numbers used by every report (align's per-record NLLs, generate's
lengths, the pipeline's students over seeds): mean, sample standard deviation, min, max and
quantiles interpolated linearly between order statistics (numpy's default, so they can be checked
against it)."""

from __future__ import annotations

import statistics
from typing import Optional, Sequence


def quantile(sorted_vals: Sequence[float], q: float) -> Optional[float]:
    """The q-quantile of already sorted values (linear interpolation); None for no values."""
    if not sorted_vals:
        return None
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict:
    """n, mean, sample sd (0 for one value), min, max, median, p10 and p90; None fields for no values."""
    vals = sorted(values)
    if not vals:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None, "median": None, "p10": None, "p90": None}
    return {
        "n": len(vals),
        "mean": statistics.fmean(vals),
        "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": vals[0],
        "max": vals[-1],
        "median": quantile(vals, 0.5),
        "p10": quantile(vals, 0.1),
        "p90": quantile(vals, 0.9),
    }
