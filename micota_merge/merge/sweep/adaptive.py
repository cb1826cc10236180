"""The adaptive search: which ratios to probe next, from the lengths measured so far.

The two experts are the bracket's ends (ratio 0 is the short-CoT side, 1 the long-CoT side). Each round
splits the bracket that holds the target length, the first crossing of the target from the short side,
into `per_round + 1` equal parts on the resolution grid (one ratio per round is bisection). Mean length
moves monotonically with the ratio in practice; where a measured point says otherwise the search says
so and keeps bracketing the first crossing, which is the shortest ratio that reaches the target.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Step:
    ratios: list[float]  # to probe next; empty when the search is done
    why: str  # why these ratios, or why it stopped
    note: str = ""  # a measured point that breaks monotonicity


def _snap(r: float, resolution: float) -> float:
    return round(round(r / resolution) * resolution, 6)


def next_ratios(
    measured: dict[float, float], target: float, resolution: float, per_round: int = 1, tolerance: float = 0.0
) -> Step:
    """`measured`: ratio -> mean probe length, with the experts at 0.0 and 1.0."""
    order = sorted(measured)
    rising = measured[1.0] >= measured[0.0]

    def below(r: float) -> bool:  # on the short side of the target
        return measured[r] < target if rising else measured[r] > target

    close = [r for r in order if 0.0 < r < 1.0 and abs(measured[r] - target) <= tolerance * target]
    if close:
        best = min(close, key=lambda r: abs(measured[r] - target))
        return Step([], f"ratio {best:g} is within {tolerance:.0%} of the target ({measured[best]:.1f} tokens)")
    lo = next((a for a, b in zip(order, order[1:]) if below(a) and not below(b)), None)
    if lo is None:
        return Step([], f"the target lies outside the experts' lengths ({measured[0.0]:.1f} to {measured[1.0]:.1f})")
    hi = order[order.index(lo) + 1]
    note = ""
    odd = [r for r in order if (r < lo and not below(r)) or (r > hi and below(r))]
    if odd:
        note = (
            f"mean length is not monotone in the ratio here (ratio {odd[0]:g}: {measured[odd[0]]:.1f} tokens); "
            "the search brackets the first crossing of the target"
        )
    span = f"{lo:g}-{hi:g} ({measured[lo]:.1f} -> {measured[hi]:.1f} tokens)"
    if hi - lo <= resolution + 1e-9:
        return Step([], f"the bracket {span} is no wider than the resolution {resolution:g}", note)
    cands = sorted(
        {_snap(lo + (hi - lo) * k / (per_round + 1), resolution) for k in range(1, per_round + 1)} - set(measured)
    )
    cands = [r for r in cands if lo < r < hi]
    if not cands:
        return Step([], f"the bracket {span} cannot be split on the {resolution:g} grid", note)
    return Step(cands, f"splits the bracket {span}", note)
