"""What "same input" means, decided in one place.

A stage's identity is a mapping of named parts (its options and its inputs' *content*
fingerprints, never their paths, shapes or headers). Every resume, cache and skip compares the
identity recorded beside an output with the one it is about to produce: equal means reuse, anything
else names what changed. `digest` is what an output's manifest records as `identity`
(micota_merge.core.ownership.Claim.same compares it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys): equal content, equal digest."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def changed(old: Optional[Mapping], new: Mapping) -> list[str]:
    """The parts of `new` whose value differs from `old`'s (all of them when nothing was recorded)."""
    old = old or {}
    return [
        k
        for k in new
        if json.dumps(old.get(k), sort_keys=True, default=str) != json.dumps(new[k], sort_keys=True, default=str)
    ]


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def describe(
    old: Optional[Mapping], new: Mapping, names: Mapping[str, str] = {}, values: bool = False, sep: str = ", "
) -> str:
    """What changed, in the words a user acts on (`names` spells each part), with the old and new
    values when `values`."""
    parts = []
    for k in changed(old, new):
        name = names.get(k, k)
        parts.append(f"{name}: was {_short((old or {}).get(k))}, now {_short(new[k])}" if values else name)
    return sep.join(parts)
