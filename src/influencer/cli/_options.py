"""Option choices and help panels shared by the commands."""

from __future__ import annotations

from enum import Enum
from typing import Any


class _Choice(str, Enum):
    """A fixed set of option values (typer lists them in --help and rejects others)."""

    def __str__(self) -> str:
        return str(self.value)


class StrategyChoice(_Choice):
    identity = "identity"
    diagonal = "diagonal"
    kfac = "kfac"
    ekfac = "ekfac"


class FisherChoice(_Choice):
    true = "true"
    empirical = "empirical"


class FormatChoice(_Choice):
    auto = "auto"
    text = "text"
    jsonl = "jsonl"
    hf = "hf"
    kjv = "kjv"


class UnitChoice(_Choice):
    line = "line"
    file = "file"


class TruncationChoice(_Choice):
    error = "error"
    right = "right"
    left = "left"


class PrecisionChoice(_Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"


class DtypeChoice(_Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"


class SetupChoice(_Choice):
    concrete = "concrete"
    digits = "digits"
    mnist = "mnist"
    kjv_lm = "kjv-lm"


class SizeChoice(_Choice):
    small = "small"
    full = "full"


def _value(choice: Any) -> Any:
    """The plain string of an option choice (None stays None)."""
    return choice.value if isinstance(choice, Enum) else choice


_DATA = "Training data"
_CURV = "Curvature"
_QUERY = "Queries"
_SCAN = "Scan"
_RUN = "Run"
