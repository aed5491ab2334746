"""Jagged sequences: flat values ``[L, ...]`` plus offsets ``[B + 1]`` (TorchRec's ``JaggedTensor``
layout; generative-recommenders' ``concat_2D_jagged`` / ``jagged_to_padded_dense``).

Row ``b`` holds ``values[offsets[b]:offsets[b + 1]]``. Everything here is index arithmetic on
offsets (no Python loop over rows), so a batch of thousands of sequences costs a few tensor ops.
"""

from __future__ import annotations

import torch

__all__ = ["concat", "from_padded", "gather_rows", "lengths", "next_values", "row_and_column", "to_padded"]


def lengths(offsets: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: the length of each row of ``offsets [B + 1]``."""
    return offsets[1:] - offsets[:-1]


def _offsets(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.numel() + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=out[1:])
    return out


def row_and_column(offsets: torch.Tensor, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``[L]`` each: the row of every value and its position within the row. With ``total``
    (``L``, the values' length) given, no host sync (``torch.export`` traces it)."""
    if total is None:
        lens = lengths(offsets)
        row = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    else:
        row = torch.searchsorted(offsets, torch.arange(total), right=True) - 1
    return row, torch.arange(row.numel()) - offsets[row]


def next_values(values: torch.Tensor, offsets: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """``[L]``: each value of jagged ``values [L]`` replaced by the next one in its row; a row's
    last value by ``last[b]`` (``last [B]``; None: it stays). No host sync."""
    row, col = row_and_column(offsets, values.shape[0])
    is_last = col == lengths(offsets)[row] - 1
    fill = values if last is None else last[row]
    return torch.where(is_last, fill, values.roll(-1))


def to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Zero-padded dense ``[B, N, *values.shape[1:]]`` of jagged ``values [L, ...]``; ``N`` is the
    longest row (or ``max_len``, which must be at least that)."""
    lens = lengths(offsets)
    n = int(lens.max()) if max_len is None and lens.numel() else (max_len or 0)
    row, col = row_and_column(offsets, values.shape[0])
    out = values.new_zeros((lens.numel(), n, *values.shape[1:]))
    out[row, col] = values
    return out


def from_padded(padded: torch.Tensor, offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Jagged values ``[L, ...]`` of the rows of ``padded [B, N, ...]`` (the inverse of
    :func:`to_padded`; ``total``: ``L``, known without a host sync)."""
    row, col = row_and_column(offsets, total)
    return padded[row, col]


def concat(
    a: torch.Tensor, a_offsets: torch.Tensor, b: torch.Tensor, b_offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise ``[a_r ‖ b_r]`` of two jagged tensors with the same number of rows.

    Args:
        a (torch.Tensor): ``[La, ...]`` with offsets ``a_offsets [B + 1]``.
        b (torch.Tensor): ``[Lb, ...]`` with offsets ``b_offsets [B + 1]``.

    Returns:
        tuple: values ``[La + Lb, ...]``, offsets ``[B + 1]``, and ``b_at`` int64 ``[Lb]``: where
        each value of ``b`` landed (so ``out[b_at]`` splits it back out).
    """
    a_rows, a_cols = row_and_column(a_offsets)
    b_rows, b_cols = row_and_column(b_offsets)
    a_lens = lengths(a_offsets)
    offsets = _offsets(a_lens + lengths(b_offsets))
    a_at = offsets[a_rows] + a_cols
    b_at = offsets[b_rows] + a_lens[b_rows] + b_cols
    out = a.new_empty((a.shape[0] + b.shape[0], *a.shape[1:]))
    out[a_at] = a
    out[b_at] = b
    return out, offsets, b_at


def gather_rows(offsets: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the values and new offsets of the jagged rows ``rows [M]`` (a row may repeat):
    ``values[index]`` with ``new_offsets [M + 1]`` is the jagged tensor of those rows in order."""
    starts = offsets[rows]
    lens = offsets[rows + 1] - starts
    new_offsets = _offsets(lens)
    index = torch.repeat_interleave(starts - new_offsets[:-1], lens) + torch.arange(int(new_offsets[-1]))
    return index, new_offsets
