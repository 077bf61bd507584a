"""The methods the PBRF experiment compares: their names (:data:`METHODS`, the default selection), the aliases the
command line accepts, their display labels, and :func:`canonical_methods`, which resolves a request to the names
:data:`METHODS` spells.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEFAULT_METHODS", "METHODS", "canonical_methods"]

METHODS = ("ekfac", "kfac", "diagonal", "lissa", "gradient-dot", "exact", "ekfac-pcg")
DEFAULT_METHODS = ("ekfac", "kfac", "lissa", "gradient-dot")
_ALIASES = {
    "identity": "gradient-dot",
    "graddot": "gradient-dot",
    "grad-dot": "gradient-dot",
    "ek-fac": "ekfac",
    "k-fac": "kfac",
    "pcg": "ekfac-pcg",
}
_LABELS = {
    "ekfac": "EK-FAC",
    "kfac": "K-FAC",
    "diagonal": "diagonal",
    "lissa": "LiSSA",
    "gradient-dot": "gradient dot product",
    "exact": "exact damped GNH (CG)",
    "ekfac-pcg": "EK-FAC + CG",
}


def canonical_methods(methods: Sequence[str]) -> list[str]:
    """Method names as :data:`METHODS` spells them (aliases such as ``identity`` or ``pcg`` resolved, duplicates
    dropped); ValueError names an unknown one."""
    out = []
    for m in methods:
        key = _ALIASES.get(m.lower(), m.lower())
        if key not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
        if key not in out:
            out.append(key)
    return out
