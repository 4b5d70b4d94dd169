"""Packed tensors on the wire: numpy arrays <-> `kvevict.v1.Tensor` (raw bytes + dtype + shape).

Decoding is zero-copy (`numpy.frombuffer`); the result is read-only. Building `repeated float`
from arrays costs ~700x more than bytes, so every tensor in the contract travels this way.
bfloat16 (numpy has no such type) travels as the upper halves of float32 bit patterns and is
decoded into float32, exactly: the one decoding that copies.
"""

from __future__ import annotations

import numpy as np

from kvevict.v1 import tensor_pb2

_NUMPY_OF = {
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
}
_PROTO_OF = {np_dtype: proto for proto, np_dtype in _NUMPY_OF.items()}
_BFLOAT16_BITS = np.dtype("<u2")


class WireError(ValueError):
    """A tensor on the wire is malformed; `field` names it in the request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def dtype_name(dtype: int) -> str:
    return tensor_pb2.DType.Name(dtype) if dtype in tensor_pb2.DType.values() else str(dtype)


def encode(array: np.ndarray) -> tensor_pb2.Tensor:
    """Packs a numeric array (float16/float32/int32/int64) into a Tensor."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _PROTO_OF:
        raise TypeError(f"no wire dtype for {array.dtype}")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return tensor_pb2.Tensor(dtype=_PROTO_OF[dtype], shape=array.shape, data=data)


def to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (uint16), rounded to nearest even like torch."""
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    # NaN must stay NaN: rounding could carry its mantissa into the exponent (an infinity).
    rounded = np.where(np.isnan(array), (bits >> 16) | 0x40, rounded)
    return rounded.astype(_BFLOAT16_BITS)


def encode_bfloat16(array: np.ndarray) -> tensor_pb2.Tensor:
    """Packs float values as DTYPE_BFLOAT16 (rounded to nearest even)."""
    return encode_bfloat16_bits(to_bfloat16_bits(np.asarray(array)))


def encode_bfloat16_bits(bits: np.ndarray) -> tensor_pb2.Tensor:
    """Packs bfloat16 bit patterns (uint16 or int16, e.g. a torch bfloat16 tensor viewed as int16)."""
    data = np.ascontiguousarray(bits).astype(_BFLOAT16_BITS, copy=False).tobytes()
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BFLOAT16, shape=bits.shape, data=data)


def decode(tensor: tensor_pb2.Tensor, field: str) -> np.ndarray:
    """Unpacks a numeric Tensor (without copying, but bfloat16 becomes float32); raises WireError
    naming `field` if malformed."""
    if tensor.dtype not in _NUMPY_OF and tensor.dtype != tensor_pb2.DTYPE_BFLOAT16:
        raise WireError(f"{field}.dtype", f"unsupported dtype {dtype_name(tensor.dtype)}")
    shape = _checked_shape(tensor, field)
    np_dtype = _BFLOAT16_BITS if tensor.dtype == tensor_pb2.DTYPE_BFLOAT16 else _NUMPY_OF[tensor.dtype]
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if len(tensor.data) != expected:
        raise WireError(
            f"{field}.data", f"holds {len(tensor.data)} bytes, shape {shape} of "
            f"{dtype_name(tensor.dtype)} needs {expected}"
        )
    array = np.frombuffer(tensor.data, dtype=np_dtype).reshape(shape)
    if tensor.dtype == tensor_pb2.DTYPE_BFLOAT16:
        # A bfloat16 is the upper half of the float32 with the same value.
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def encode_bits(mask: np.ndarray) -> tensor_pb2.Tensor:
    """Packs a boolean array into DTYPE_PACKED_BITS along its last axis."""
    mask = np.asarray(mask, dtype=bool)
    data = np.packbits(mask, axis=-1, bitorder="little").tobytes()
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_PACKED_BITS, shape=mask.shape, data=data)


def decode_bits(tensor: tensor_pb2.Tensor, field: str) -> np.ndarray:
    """Unpacks a DTYPE_PACKED_BITS Tensor into a boolean array of its shape."""
    if tensor.dtype != tensor_pb2.DTYPE_PACKED_BITS:
        raise WireError(f"{field}.dtype", f"expected DTYPE_PACKED_BITS, got {dtype_name(tensor.dtype)}")
    shape = _checked_shape(tensor, field)
    if not shape:
        raise WireError(f"{field}.shape", "packed bits need at least one dimension")
    row_bytes = (shape[-1] + 7) // 8
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if len(tensor.data) != rows * row_bytes:
        raise WireError(f"{field}.data", f"holds {len(tensor.data)} bytes, shape {shape} needs {rows * row_bytes}")
    packed = np.frombuffer(tensor.data, dtype=np.uint8).reshape(*shape[:-1], row_bytes)
    return np.unpackbits(packed, axis=-1, count=shape[-1], bitorder="little").astype(bool)


def _checked_shape(tensor: tensor_pb2.Tensor, field: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{field}.shape", f"negative dimension in {shape}")
    return shape
