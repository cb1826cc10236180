"""The merge-method table: what a recipe's `merge.method` is, one entry per mergekit method.

Read by the recipe (`recipe.py`: which methods are valid, which need `models.base`, which take
a density, which parameters pass through, how `to_mergekit()` writes the ratio), the build
(`build.py` through the recipe) and the sweep's one pass (`onepass/engine.py`, `sweep/run.py`).
Adding a method mergekit registers = one `register_method(...)` (below for the shipped ones);
docs/extending.md says what else to check.

Ratio semantics (λ = `merge.ratio`, the long-CoT side's share):
  weights   each side gets a mergekit `weight`, λ for long_cot and 1 − λ for short_cot (a side
            of weight 0 left out); with a base the sides are task vectors (x − base)
  slerp_t   mergekit's `t` = λ, from short_cot (t = 0, the base_model) towards long_cot
One pass (several ratios or densities from a single read of the inputs):
  combine   a fixed combination per ratio (engine.combine: the weighted mean, or base + Σ w·Δ);
            with a base and any pass-through parameter or a density it is replayed instead
  replay    mergekit's own planner and functions replayed per point (onepass/replay.py)
  None      built point by point with `build`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

RATIO_SEMANTICS = ("weights", "slerp_t")
ONE_PASS_KINDS = ("combine", "replay", None)


@dataclass(frozen=True)
class Method:
    name: str
    base: bool  # merges task vectors from models.base (needs it)
    density: bool = False  # sparsifying: takes merge.density and sweep.densities
    one_pass: Optional[str] = None  # "combine", "replay" or None (see above)
    ratio: str = "weights"  # how the ratio reaches mergekit (see above)
    params: frozenset = frozenset()  # mergekit parameters a recipe may pass through
    numeric: frozenset = frozenset()  # those of them that must be numbers


_TABLE: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    base: bool,
    density: bool = False,
    one_pass: Optional[str] = None,
    ratio: str = "weights",
    params=(),
    numeric=(),
) -> Method:
    """Add (or replace) a method; `name` must be one mergekit registers (build checks it there)."""
    if one_pass not in ONE_PASS_KINDS:
        raise ValueError(f"method {name}: one_pass {one_pass!r}; use combine, replay or None")
    if ratio not in RATIO_SEMANTICS:
        raise ValueError(f"method {name}: ratio {ratio!r}; use one of {', '.join(RATIO_SEMANTICS)}")
    if one_pass == "combine" and (density or ratio != "weights"):
        raise ValueError(f"method {name}: a fixed combination has weights and no density")
    if not set(numeric) <= set(params):
        raise ValueError(f"method {name}: numeric parameters must be among its parameters")
    entry = Method(name, base, density, one_pass, ratio, frozenset(params), frozenset(numeric))
    _TABLE[name] = entry
    return entry


def unregister_method(name: str) -> None:
    _TABLE.pop(name, None)


def get(name: str) -> Method:
    try:
        return _TABLE[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """Every method, the interpolations (no base) first, then the task-vector ones, each in table order."""
    return tuple(m for m, e in _TABLE.items() if not e.base) + tuple(m for m, e in _TABLE.items() if e.base)


def sparsifying() -> tuple[str, ...]:
    return tuple(m for m in names() if _TABLE[m].density)


def one_pass() -> tuple[str, ...]:
    return tuple(m for m in names() if _TABLE[m].one_pass is not None)


# ------------------------------------------------------------------------ the shipped ones

_TV = ("normalize", "rescale", "lambda", "int8_mask")  # mergekit's generalized task arithmetic
register_method("linear", base=False, one_pass="combine", params={"normalize"})
register_method("slerp", base=False, ratio="slerp_t")
register_method("task_arithmetic", base=True, one_pass="combine", params=_TV, numeric={"lambda"})
for _name in ("ties", "dare_ties", "dare_linear"):
    register_method(_name, base=True, density=True, one_pass="replay", params=_TV, numeric={"lambda"})
for _name in ("breadcrumbs", "breadcrumbs_ties"):
    register_method(
        _name, base=True, density=True, one_pass="replay", params=_TV + ("gamma",), numeric={"lambda", "gamma"}
    )
for _name in ("della", "della_linear"):
    register_method(
        _name, base=True, density=True, one_pass="replay", params=_TV + ("epsilon",), numeric={"lambda", "epsilon"}
    )
