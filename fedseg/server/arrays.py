"""Reading the arrays of a Flower message without decoding them: sizes, dtypes and read-only views.

Flower sends each array as numpy's ``.npy`` bytes; the header alone says its shape, order and dtype.
"""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.common import Parameters


def npy_header(tensor: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and data offset of one serialized array, from its header only."""
    stream = io.BytesIO(tensor)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return shape, fortran, np.dtype(dtype), stream.tell()


def array_dtype(tensor: bytes) -> np.dtype:
    """The dtype of one serialized array."""
    return npy_header(tensor)[2]


def parameters_view(parameters: Parameters) -> list[np.ndarray]:
    """``parameters_to_ndarrays`` without the copy: read-only arrays over the message's bytes (for code
    that only reads them, e.g. screening 4 x 98 MB of replies every round)."""
    views = []
    for tensor in parameters.tensors:
        shape, fortran, dtype, offset = npy_header(tensor)
        flat = np.frombuffer(tensor, dtype=dtype, count=math.prod(shape), offset=offset)
        views.append(flat.reshape(shape, order="F" if fortran else "C"))
    return views


def parameters_bytes(parameters: Parameters) -> int:
    """Serialized size of a parameter set as it travels (Flower's ndarray bytes)."""
    return sum(len(t) for t in parameters.tensors)
