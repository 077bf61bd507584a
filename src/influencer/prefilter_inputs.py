"""The inputs the BM25 prefilter accepts, as flat arrays: token-id sequences (a [N, T] tensor or array, or a list
of variable-length sequences) with optional masks, checked and flattened to (document index, term) pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _as_int_array(seq: Any, what: str) -> np.ndarray:
    if isinstance(seq, torch.Tensor):
        seq = seq.detach().cpu().numpy()
    arr = np.asarray(seq)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.int64)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer ids, got dtype {arr.dtype}.")
    return arr.astype(np.int64, copy=False)


def _as_mask_array(mask: Any, what: str) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=bool)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be numeric or boolean, got dtype {arr.dtype}.")
    return arr != 0


def _flatten(seqs: Any, mask: Any, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, id) pairs of the unmasked tokens of ``seqs`` and the number of rows; ids not yet filtered."""
    if isinstance(seqs, torch.Tensor | np.ndarray):
        ids = _as_int_array(seqs, what)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2:
            raise ValueError(f"{what} must be [N, T] or [T], got shape {tuple(ids.shape)}.")
        keep = np.ones(ids.shape, dtype=bool)
        if mask is not None:
            m = _as_mask_array(mask, f"{what} mask")
            m = m[None, :] if m.ndim == 1 else m
            if m.shape != ids.shape:
                raise ValueError(f"{what} mask has shape {tuple(m.shape)} but the ids have {tuple(ids.shape)}.")
            keep &= m
        rows, pos = np.nonzero(keep)
        return rows.astype(np.int64), ids[rows, pos], ids.shape[0]
    if isinstance(seqs, str) or not isinstance(seqs, Sequence):
        raise ValueError(
            f"{what} must be a LongTensor [N, T], a list of 1-D id sequences or a dict with 'input_ids'; "
            f"got {type(seqs).__name__}."
        )
    arrays = []
    for i, s in enumerate(seqs):
        if isinstance(s, int | np.integer):
            raise ValueError(f"{what} is a flat list of ids; wrap a single sequence in a list: [[...]].")
        a = _as_int_array(s, f"{what}[{i}]")
        if a.ndim != 1:
            raise ValueError(f"{what}[{i}] must be 1-D, got shape {tuple(a.shape)}.")
        arrays.append(a)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(arrays), dtype=np.int64), lengths)
    if mask is not None:
        if isinstance(mask, torch.Tensor | np.ndarray) or len(mask) != len(arrays):
            raise ValueError(f"{what} mask must be a list with one 1-D mask per sequence.")
        masks = [_as_mask_array(m, f"{what} mask[{i}]").reshape(-1) for i, m in enumerate(mask)]
        for i, (m, a) in enumerate(zip(masks, arrays, strict=True)):
            if len(m) != len(a):
                raise ValueError(f"{what} mask[{i}] has {len(m)} entries but the sequence has {len(a)}.")
        keep = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
        rows, ids = rows[keep], ids[keep]
    return rows, ids, len(arrays)


def _and_masks(a: Any, b: Any) -> Any:
    """Elementwise AND of two masks in the same layout (tensors/arrays, or lists of 1-D sequences)."""
    if isinstance(a, torch.Tensor | np.ndarray) and isinstance(b, torch.Tensor | np.ndarray):
        a, b = _as_mask_array(a, "attention_mask"), _as_mask_array(b, "query_mask")
        if a.shape != b.shape:
            raise ValueError(f"query_mask has shape {b.shape} but attention_mask has {a.shape}.")
        return a & b
    if len(a) != len(b):
        raise ValueError(f"query_mask has {len(b)} rows but attention_mask has {len(a)}.")
    out = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        x, y = _as_mask_array(x, "attention_mask").reshape(-1), _as_mask_array(y, "query_mask").reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"query_mask[{i}] has {len(y)} entries but attention_mask[{i}] has {len(x)}.")
        out.append(x & y)
    return out
