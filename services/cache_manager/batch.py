"""Every layer of a report in one buffer: the layout the batched decision path computes on.

A report's per-(layer, KV head, token) arrays are stored flat, layer after layer, each layer's
(kv_heads, cache_length) block row-major, so elementwise work is one numpy call over the whole
model however the layers' lengths differ (the adaptive allocator makes them differ), and
per-row work runs once per group of consecutive layers of one shape (a single call when every
layer has the same length). The per-layer arrays the rest of the manager sees are views.

Also here: the wire's 16-bit statistics decoded in bulk. numpy's float16 -> float32 cast is a
scalar loop (2.9 ms for the 2.16 M values of a Llama-3.1-8B report); the bit manipulation below
is exact and vectorised (~0.3 ms), and the finiteness and sign checks are one integer max over
the raw bits; with the compiled kernels (kvevict.cache_manager.kernels) decoding and checking
are one pass (~0.08 ms). The manager stays torch-free (its image does not ship torch).

`LayerStack` is a tuple of per-layer arrays that are views of one flat buffer, which it carries:
the form decisions store a session's positions and accumulators in, so the next decision reads
them as one buffer without joining them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kvevict.cache_manager import kernels
from kvevict.v1 import tensor_pb2

# float16 bits << 13 are the float32 bits of (value * 2**-112), exponent bias 15 -> 127 aside:
# one exact multiplication by 2**112 rescales normal and subnormal values alike.
_F16_RESCALE = np.float32(2.0**112)
# Bits of the smallest non-negative non-finite value: float16 / bfloat16 / float32 infinity.
# A non-negative statistic is valid exactly when every element's bits are below it, or the
# element is -0.0 (which the fast check leaves to the exact path).
_INFINITY_BITS = {tensor_pb2.DTYPE_FLOAT16: 0x7C00, tensor_pb2.DTYPE_BFLOAT16: 0x7F80,
                  tensor_pb2.DTYPE_FLOAT32: 0x7F800000}
_MAGNITUDE_MASK = {tensor_pb2.DTYPE_FLOAT16: 0x7FFF, tensor_pb2.DTYPE_BFLOAT16: 0x7FFF,
                   tensor_pb2.DTYPE_FLOAT32: 0x7FFFFFFF}
_BITS = {tensor_pb2.DTYPE_FLOAT16: np.dtype("<u2"), tensor_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),
         tensor_pb2.DTYPE_FLOAT32: np.dtype("<u4")}
_KERNEL_KINDS = {tensor_pb2.DTYPE_FLOAT16: kernels.FLOAT16, tensor_pb2.DTYPE_BFLOAT16: kernels.BFLOAT16,
                 tensor_pb2.DTYPE_FLOAT32: kernels.FLOAT32}
# Clears bits 28-30 of a sign-extended float16 shifted by 13: the sign then sits at bit 31.
_SIGNED_F16_MASK = np.uint32(0x8FFFFFFF)


def _subnormals_are_kept() -> bool:
    """False when the FPU flushes subnormal float32 inputs to zero (DAZ, e.g. after
    torch.set_flush_denormal(True) in an embedding process): the rescaling trick needs them."""
    probe = np.array([1 << 13], dtype=np.uint32).view(np.float32) * _F16_RESCALE
    return bool(probe[0] == np.float32(2.0**-24))


def decode_statistic(data: bytes, dtype: int, non_negative: bool) -> np.ndarray | None:
    """The float32 values of the concatenated raw `data` of one statistic's tensors (wire dtype
    `dtype`), or None where they need the exact per-tensor path: a value that is NaN or
    infinite, negative where `non_negative`, or -0.0 in a non-negative statistic (valid, but
    rare: the exact path keeps it bit for bit). The result is a fresh, writable array."""
    if kernels.enabled:
        return kernels.decode(data, _KERNEL_KINDS[dtype], non_negative)
    bits = np.frombuffer(data, dtype=_BITS[dtype])
    if bits.size == 0:
        return np.zeros(0, np.float32)
    limit = _INFINITY_BITS[dtype]
    if non_negative:
        if int(bits.max()) >= limit:
            return None
    elif int(np.bitwise_and(bits, _MAGNITUDE_MASK[dtype]).max()) >= limit:
        return None
    if dtype == tensor_pb2.DTYPE_FLOAT32:
        return bits.view(np.float32).copy()
    if dtype == tensor_pb2.DTYPE_BFLOAT16:
        # A bfloat16 is the upper half of the float32 with the same value.
        return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)
    if not _subnormals_are_kept():
        return bits.view(np.float16).astype(np.float32)
    if non_negative:
        out = np.left_shift(bits, 13, dtype=np.uint32)
    else:
        # int16 -> uint32 sign-extends: after the shift the sign is at bit 28 and copies of it at
        # 29-31; the mask keeps the one at 31.
        out = np.left_shift(bits.view(np.int16), 13, dtype=np.uint32, casting="unsafe")
        np.bitwise_and(out, _SIGNED_F16_MASK, out=out)
    values = out.view(np.float32)
    np.multiply(values, _F16_RESCALE, out=values)
    return values


@dataclass(frozen=True)
class Layout:
    """Where each layer's (kv_heads, length) block lies in a flat buffer."""

    heads: int
    lengths: tuple[int, ...]

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of every layer's block, and the total at the end."""
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(np.asarray(self.lengths, np.int64) * self.heads)]))

    @property
    def size(self) -> int:
        return self.offsets[-1]

    @cached_property
    def offsets_array(self) -> np.ndarray:
        """`offsets` as an intp array (what the kernels take)."""
        return np.asarray(self.offsets, dtype=np.intp)

    @cached_property
    def lengths_array(self) -> np.ndarray:
        return np.asarray(self.lengths, dtype=np.intp)

    def layer(self, flat: np.ndarray, layer: int) -> np.ndarray:
        """Layer `layer`'s (kv_heads, length) view of `flat`."""
        start, stop = self.offsets[layer], self.offsets[layer + 1]
        return flat[start:stop].reshape(self.heads, self.lengths[layer])

    def layers(self, flat: np.ndarray) -> list[np.ndarray]:
        if self.lengths and all(n == self.lengths[0] for n in self.lengths):  # one reshape, its layers
            return list(flat[:self.size].reshape(len(self.lengths), self.heads, self.lengths[0]))
        return [self.layer(flat, layer) for layer in range(len(self.lengths))]

    def groups(self, keys: Sequence[object] | None = None) -> list[tuple[int, int]]:
        """Runs [start, stop) of consecutive layers with one length (and one `keys[layer]`)."""
        runs: list[tuple[int, int]] = []
        start = 0
        for layer in range(1, len(self.lengths) + 1):
            if (layer == len(self.lengths) or self.lengths[layer] != self.lengths[start]
                    or (keys is not None and keys[layer] != keys[start])):
                runs.append((start, layer))
                start = layer
        return runs

    def rows(self, flat: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Layers [start, stop) of one length as one (layers x kv_heads, length) view."""
        return flat[self.offsets[start]:self.offsets[stop]].reshape(-1, self.lengths[start])

    def grouped_rows(self, flat: np.ndarray, keys: Sequence[object] | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        for start, stop in self.groups(keys):
            yield start, stop, self.rows(flat, start, stop)


def joined(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """2-D arrays of one shape (rows, n) as one (len x rows, n) array: a view when they lie back
    to back in one buffer with the same strides (as the batched path stores a state's layers),
    else a copy."""
    first = arrays[0]
    if len(arrays) == 1:
        return first
    if first.size == 0:
        return np.zeros((sum(a.shape[0] for a in arrays), first.shape[1]), first.dtype)
    base = first.base
    step = first.shape[0] * first.strides[0]
    address = first.__array_interface__["data"][0]
    if isinstance(base, np.ndarray) and all(
            a.base is base and a.shape == first.shape and a.strides == first.strides and a.dtype == first.dtype
            and a.__array_interface__["data"][0] == address + i * step for i, a in enumerate(arrays)):
        low, high = np.byte_bounds(base) if hasattr(np, "byte_bounds") else np.lib.array_utils.byte_bounds(base)
        end = address + (len(arrays) * first.shape[0] - 1) * first.strides[0] + (first.shape[1] - 1) * first.strides[1]
        if low <= address and end + first.itemsize <= high:
            return np.lib.stride_tricks.as_strided(first, shape=(len(arrays) * first.shape[0], first.shape[1]),
                                                   strides=first.strides, writeable=False)
    return np.concatenate(arrays, axis=0)


class LayerStack(tuple):
    """Per-layer arrays (a tuple of them) that are views of `flat`, one 1-D buffer holding them
    layer after layer, each C-contiguous (`Layout.layers` of it)."""

    flat: np.ndarray

    def __new__(cls, layers: Sequence[np.ndarray], flat: np.ndarray) -> LayerStack:
        stack = super().__new__(cls, layers)
        stack.flat = flat
        return stack

    @classmethod
    def of(cls, flat: np.ndarray, layout: Layout) -> LayerStack:
        return cls(layout.layers(flat), flat)


def flat_layers(arrays: Sequence[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """The arrays' elements in one 1-D buffer, layer after layer: a LayerStack's own, else a copy."""
    flat = getattr(arrays, "flat", None)
    if flat is not None and flat.dtype == dtype:
        return flat
    if not arrays:
        return np.zeros(0, dtype)
    return np.concatenate([np.asarray(a, dtype).ravel() for a in arrays])
