"""Turns Python token batches into the C ABI's int32 [batch, stride] matrix + lengths, copying only when needed."""
import numpy as np

from ._lib import c_int32_p
from .errors import invalid

_INT32 = np.iinfo(np.int32)


def as_int32(arr, what, where):
    """`arr` as a C-contiguous int32 array: the same object when it already is one, else a checked copy."""
    if isinstance(arr, np.ndarray):
        if arr.dtype == np.int32 and arr.flags.c_contiguous:
            return arr  # zero copy: the library reads this buffer directly
        if arr.size == 0 and arr.dtype != object:
            return np.zeros(arr.shape, dtype=np.int32)  # np.asarray([]) is float64: no values, nothing to check
        if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "b"):
            raise invalid(f"{what} must hold integers, got dtype {arr.dtype}", where)
        if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
            raise invalid(f"{what} has values outside int32", where)
        return np.ascontiguousarray(arr, dtype=np.int32)
    try:
        out = np.asarray(arr)
    except (ValueError, TypeError) as e:
        raise invalid(f"{what} must be integers: {e}", where) from None
    if out.dtype == object or (out.size and out.dtype.kind not in "iu"):
        raise invalid(f"{what} must be integers, got {type(arr).__name__} of {out.dtype}", where)
    if out.size and (out.min() < _INT32.min or out.max() > _INT32.max):
        raise invalid(f"{what} has values outside int32", where)
    return np.ascontiguousarray(out, dtype=np.int32)


def token_batch(ids, lengths, where):
    """(ids int32 [batch, stride], lengths int32 [batch] or None) from a 2-D array or a list of token lists.

    A list of lists is padded with 0 to its longest row and its lengths are the row lengths (unless given).
    A 1-D input is one row.
    """
    if isinstance(ids, np.ndarray):
        if ids.ndim == 1:
            ids = ids.reshape(1, -1)
        if ids.ndim != 2:
            raise invalid(f"ids must be 2-D [batch, stride], got shape {ids.shape}", where)
        mat = as_int32(ids, "ids", where)
    else:
        rows = list(ids)
        if not rows:
            raise invalid("ids is empty (need at least one row)", where)
        if all(isinstance(r, (int, np.integer)) for r in rows):
            rows = [rows]
        try:
            rows = [list(r) for r in rows]
        except TypeError:
            raise invalid("ids must be a list of token lists or a 2-D array", where) from None
        width = max(len(r) for r in rows)
        if width == 0:
            raise invalid("every row of ids is empty", where)
        mat = np.zeros((len(rows), width), dtype=np.int32)
        row_lengths = []
        for b, r in enumerate(rows):
            if r:
                mat[b, : len(r)] = as_int32(r, f"ids row {b}", where)
            row_lengths.append(len(r))
        if lengths is None and any(n != width for n in row_lengths):
            lengths = row_lengths
    if mat.shape[0] == 0 or mat.shape[1] == 0:
        raise invalid(f"ids must have at least one row and one column, got shape {mat.shape}", where)
    if lengths is not None:
        lengths = as_int32(lengths, "lengths", where)
        if lengths.ndim != 1 or lengths.shape[0] != mat.shape[0]:
            raise invalid(f"lengths must be 1-D with one entry per row ({mat.shape[0]}), got shape {lengths.shape}",
                          where)
    return mat, lengths


def ptr(arr):
    """An int32* into `arr` (None for None)."""
    return None if arr is None else arr.ctypes.data_as(c_int32_p)
