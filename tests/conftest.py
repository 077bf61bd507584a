"""Shared test settings: one thread (CI runs on 2 cores), no progress bars."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
