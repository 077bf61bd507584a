"""Optional dependencies of the analysis and report modules (the ``report`` extra), imported on first use."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_HINT = "pip install 'influencer[report]'"


def require(module: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        raise ImportError(f"{top} is needed for influencer's analysis and report: {EXTRA_HINT}") from err
