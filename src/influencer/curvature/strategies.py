"""The curvature strategies as one table: what each fits and how it preconditions.

Every decision that depends on the strategy reads its record here instead of comparing names, so a new strategy
(say, a block-wise MoE variant) is one more row, not edits in six files.

- ``stages``: the fitting passes, in order (``covariance`` → eigenbases of A and S; ``eigenvalues`` → Λ in that
  basis; ``diagonal`` → Λ in the standard basis).
- ``basis``: preconditions in the Kronecker eigenbasis Q_S ⊗ Q_A (K-FAC, EK-FAC) rather than the standard one.
- ``kronecker_lambda``: Λ is the outer product of the eigenvalues of S and A, scaled by tokens per sequence
  (K-FAC), instead of being fitted (EK-FAC, diagonal).
- ``curved``: has a curvature at all (identity has none: no Λ, no damping, gradient dot products).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    """One row of the table (see the module docstring)."""

    name: str
    stages: tuple[str, ...]
    basis: bool
    kronecker_lambda: bool
    curved: bool
    summary: str

    @property
    def first_stage(self) -> str:
        """The stage a fit (or a partition without a basis) starts with."""
        return self.stages[0]

    @property
    def basis_stage(self) -> str | None:
        """The stage that needs the eigenbases of an earlier one (EK-FAC's Λ), or None."""
        return self.stages[1] if len(self.stages) > 1 else None


TABLE: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("identity", (), basis=False, kronecker_lambda=False, curved=False, summary="gradient dot products"),
        Strategy(
            "diagonal", ("diagonal",), basis=False, kronecker_lambda=False, curved=True, summary="diagonal Fisher"
        ),
        Strategy("kfac", ("covariance",), basis=True, kronecker_lambda=True, curved=True, summary="K-FAC"),
        Strategy(
            "ekfac",
            ("covariance", "eigenvalues"),
            basis=True,
            kronecker_lambda=False,
            curved=True,
            summary="EK-FAC (the paper's)",
        ),
    )
}


def strategy(name: str) -> Strategy:
    """The record of strategy ``name``; ValueError naming the choices otherwise."""
    try:
        return TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"strategy must be one of {tuple(TABLE)}, got {name!r}") from None
