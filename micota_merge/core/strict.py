"""Numeric option types that refuse booleans.

pydantic reads `true` as 1 and `false` as 0 for int and float fields, so `merge.ratio: true` merged
at 1.0 and `limit: false` meant 0. A boolean in a numeric field is a mistake, never a number; every
other coercion pydantic makes (an int for a float, "0.5" for 0.5) keeps the meaning and is kept.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number is needed here, not true/false")
    return value


Int = Annotated[int, BeforeValidator(not_bool)]
Float = Annotated[float, BeforeValidator(not_bool)]
