"""Fuzzing both services through real gRPC: every RPC of CacheManagerService and WorkerService,
fed requests built field by field from their descriptors, valid requests with one field
changed, and raw bytes sent as they are. Whatever arrives, a call must end with a status a
client can act on (OK, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ABORTED,
RESOURCE_EXHAUSTED, OUT_OF_RANGE, UNAUTHENTICATED, PERMISSION_DENIED), never UNKNOWN or
INTERNAL; bytes that are no message must be INVALID_ARGUMENT; both servers must stay up and
healthy; a manager call must get the status (and, when OK, the bytes) an in-process
ManagerCore gives for the same calls; and a well-formed generation running alongside must
stream exactly what it streams alone.

The servers are real processes: a redis-server on a free port, `kvevict manager serve` on it,
and `kvevict worker serve` on a tiny checkpoint using that manager (fail-open off, so a
manager failure cannot hide behind the worker's fallback). tests/test_rpc_fuzz.py runs the
same generators (a few hundred cases) in CI.

    .venv/bin/python benchmarks/fuzz.py                         # 10,000 requests, seed 0
    .venv/bin/python benchmarks/fuzz.py --requests 50000 --seed 7
    .venv/bin/python benchmarks/fuzz.py --quick                 # a few hundred (its test runs it)
    .venv/bin/python benchmarks/fuzz.py --replay fuzz-failures.json

Every failing case is written to `--failures` (JSON: each step's method and request bytes);
`--replay` sends those steps again to fresh servers and prints what each got. Exit status 1
when anything failed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import operator
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.servers: the process helpers

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from google.protobuf.descriptor import Descriptor, FieldDescriptor  # noqa: E402
from google.protobuf.message import DecodeError, Message  # noqa: E402
from google.protobuf.message_factory import GetMessageClass  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from hypothesis import HealthCheck, Phase, assume, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from benchmarks.perf_timing import load_line, markdown, percentile  # noqa: E402
from benchmarks.service_load import CpuMeter  # noqa: E402
from kvevict import wire  # noqa: E402
from kvevict.v1 import cache_manager_pb2 as pb  # noqa: E402
from kvevict.v1 import tensor_pb2, worker_pb2  # noqa: E402
from tests.servers import RedisServer, ServerProcess, channel, start_manager  # noqa: E402

# -- what is allowed ----------------------------------------------------------------------------

ALLOWED = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ABORTED",
                     "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "UNAUTHENTICATED", "PERMISSION_DENIED"})
# Details of a status the client's gRPC made up because the server's answer could not be read
# (trailing metadata, where the status details travel, over the 16 KiB limit): a client acts on a
# status the server never sent.
TRANSPORT_LOST = re.compile(r"^Stream removed|metadata size exceeds")
TIMEOUT_S = 60.0  # per call; a call still running then is a hang (DEADLINE_EXCEEDED: a failure)

SERVICES = (pb.DESCRIPTOR.services_by_name["CacheManagerService"],
            worker_pb2.DESCRIPTOR.services_by_name["WorkerService"])


@dataclass(frozen=True)
class Rpc:
    """One method of one of the two services, as its descriptor says."""

    name: str
    service: str
    request: type[Message]
    response: type[Message]
    streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def on_manager(self) -> bool:
        return self.service == SERVICES[0].full_name


RPCS: dict[str, Rpc] = {
    method.name: Rpc(method.name, service.full_name, GetMessageClass(method.input_type),
                     GetMessageClass(method.output_type), method.server_streaming)
    for service in SERVICES for method in service.methods
}

# Stand-ins for ids the servers choose, 32 hex digits like the real ones (uuid4().hex), so that
# swapping in the real id at send time keeps every length prefix of the bytes right.
SESSION = "5e5510" + "0" * 26
CONVERSATION = "c0de" + "0" * 28
assert len(SESSION) == len(CONVERSATION) == 32

# -- values of each field type ------------------------------------------------------------------

T = FieldDescriptor
_INT_RANGES = {
    T.TYPE_INT32: (-2**31, 2**31 - 1), T.TYPE_SINT32: (-2**31, 2**31 - 1), T.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    T.TYPE_INT64: (-2**63, 2**63 - 1), T.TYPE_SINT64: (-2**63, 2**63 - 1), T.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    T.TYPE_UINT32: (0, 2**32 - 1), T.TYPE_FIXED32: (0, 2**32 - 1),
    T.TYPE_UINT64: (0, 2**64 - 1), T.TYPE_FIXED64: (0, 2**64 - 1),
}
FLOAT_EDGES = (math.nan, math.inf, -math.inf, -0.0, 0.0, -1.0, 1e-45, 1e-38, 0.5, 1.0, 1.0000001, 2.0,
               65504.0, 3.4028235e38, 1e300, -1e300)
# Words the services know (reach past "unknown name" checks), near misses, and the placeholders
# (a generated session_id is now and then the case's live session).
VOCABULARY = ("", "h2o", "tova", "tova-mean", "snapkv", "keydiff", "streaming", "random", "valuenorm",
              "querycaote", "obcv", "obck", "obcvk", "laprox", "none", "caote", "fastcaote", "uniform",
              "pyramid", "adaptive", "caote+h2o", "fastcaote+snapkv", "H2O", " h2o", "h2o\x00", "h2o\n",
              "system", "user", "assistant", "tool", "<|user|>", "{{ messages }}", "{% endfor %}",
              "\n", "\x00", "def", "return", SESSION, CONVERSATION, "0" * 32, "g" * 32, "x" * 129, "a/b", "..")
_FILL = ("a", "é", "日本", "\x00", "🙂", "def add(a, b):\n", "\ufffd")


def integers_in(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Edges of the type and of the common ranges, small values (budgets, windows), anything."""
    edges = sorted({v for v in (lo, lo + 1, -(2**31), -1, 0, 1, 2, 3, 7, 8, 2**31 - 1, 2**31, 2**32 - 1,
                                2**53 + 1, 2**62, 2**63 - 1, hi - 1, hi) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -3), min(hi, 70)), st.integers(lo, hi))


def floats_of(width: int) -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(0.0, 2.0, width=width),
                     st.floats(width=width, allow_nan=True, allow_infinity=True))


def strings() -> st.SearchStrategy[str]:
    long = st.builds(operator.mul, st.sampled_from(_FILL), st.sampled_from([300, 5_000, 70_000]))
    return st.one_of(st.sampled_from(VOCABULARY), st.text(st.characters(codec="utf-8"), max_size=24),
                     st.text(st.characters(min_codepoint=0x80, codec="utf-8"), max_size=12), long)


def binaries() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), st.binary(min_size=200, max_size=2048))


def enum_values(enum) -> st.SearchStrategy[int]:
    """Known values and unknown ones (proto3 enums are open: any int32 decodes)."""
    return st.one_of(st.sampled_from([v.number for v in enum.values]), integers_in(-2**31, 2**31 - 1))


def scalar_values(field_: FieldDescriptor) -> st.SearchStrategy:
    kind = field_.type
    if kind in _INT_RANGES:
        return integers_in(*_INT_RANGES[kind])
    if kind == T.TYPE_FLOAT:
        return floats_of(32)
    if kind == T.TYPE_DOUBLE:
        return floats_of(64)
    if kind == T.TYPE_BOOL:
        return st.booleans()
    if kind == T.TYPE_STRING:
        return strings()
    if kind == T.TYPE_BYTES:
        return binaries()
    if kind == T.TYPE_ENUM:
        return enum_values(field_.enum_type)
    raise TypeError(f"no values for {field_.full_name}")


# -- tensors ------------------------------------------------------------------------------------

_ITEM_BYTES = {tensor_pb2.DTYPE_FLOAT16: 2, tensor_pb2.DTYPE_FLOAT32: 4, tensor_pb2.DTYPE_INT32: 4,
               tensor_pb2.DTYPE_INT64: 8, tensor_pb2.DTYPE_BFLOAT16: 2}
_DIM_EDGES = (-1, -(2**63), 2**31, 2**32 + 1, 2**62, 2**63 - 1)


def tensor_bytes(dtype: int, shape: Sequence[int]) -> int | None:
    """Bytes a well-formed tensor of this dtype and shape holds (None: unknown dtype, a negative
    or absurd shape)."""
    if any(d < 0 for d in shape) or math.prod(shape) > 1 << 16:
        return None
    if dtype == tensor_pb2.DTYPE_PACKED_BITS:
        return (math.prod(shape[:-1]) * ((shape[-1] + 7) // 8)) if shape else None
    size = _ITEM_BYTES.get(dtype)
    return None if size is None else math.prod(shape) * size


def encode_like(values: np.ndarray, dtype: int) -> bytes:
    """`values` as the raw bytes of a tensor of `dtype` (numeric dtypes only)."""
    if dtype == tensor_pb2.DTYPE_BFLOAT16:
        return wire.to_bfloat16_bits(np.asarray(values, dtype=np.float32)).tobytes()
    numpy_dtype = {tensor_pb2.DTYPE_FLOAT16: "<f2", tensor_pb2.DTYPE_FLOAT32: "<f4",
                   tensor_pb2.DTYPE_INT32: "<i4", tensor_pb2.DTYPE_INT64: "<i8"}[dtype]
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values wrap or saturate: fine here
        values = np.asarray(values, dtype=np.float64)
        if numpy_dtype.startswith("<i"):
            return np.nan_to_num(values).astype(np.int64).astype(numpy_dtype).tobytes()
        return values.astype(numpy_dtype).tobytes()


@st.composite
def tensors(draw) -> tensor_pb2.Tensor:
    """A Tensor of any dtype (unknown ones too) and shape (negative, huge, empty), whose data is
    the right length, a few bytes short or long, empty, or anything."""
    dtype = draw(st.one_of(st.sampled_from(list(tensor_pb2.DType.values())), integers_in(-2**31, 2**31 - 1)))
    shape = draw(st.lists(st.one_of(st.integers(0, 12), st.sampled_from(_DIM_EDGES)), max_size=4))
    size = tensor_bytes(dtype, shape)
    mode = draw(st.sampled_from(["exact", "values", "short", "long", "empty", "any"]))
    if size is None or mode == "any":
        data = draw(binaries())
    elif mode == "values" and dtype in _ITEM_BYTES:
        count = size // _ITEM_BYTES[dtype]
        data = encode_like(np.array(draw(st.lists(st.sampled_from(FLOAT_EDGES + (3.0, 1e9)), min_size=count,
                                                  max_size=count)), dtype=np.float64), dtype)
    elif mode == "empty":
        data = b""
    else:
        data = draw(st.binary(min_size=size, max_size=size))
        if mode == "short" and data:
            data = data[:-draw(st.integers(1, len(data)))]
        elif mode == "long":
            data += draw(st.binary(min_size=1, max_size=9))
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


# -- messages from their descriptors ------------------------------------------------------------

MAX_DEPTH = 3
# Longer lists where length is what a check is about (a prompt of token ids above the limit).
MAX_REPEATED = {"kvevict.v1.TokenIds.ids": 320, "kvevict.v1.ModelGeometry.sliding_windows": 8}


def real_oneofs(descriptor: Descriptor) -> list:
    """The message's oneofs, without proto3 `optional`'s one-field synthetic ones."""
    return [o for o in descriptor.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]


def message_values(message_type: Descriptor, depth: int) -> st.SearchStrategy[Message]:
    if message_type.full_name == tensor_pb2.Tensor.DESCRIPTOR.full_name:
        return tensors()
    cls = GetMessageClass(message_type)
    return st.just(cls()) if depth >= MAX_DEPTH else messages(cls, depth + 1)


def field_values(field_: FieldDescriptor, depth: int) -> st.SearchStrategy:
    """A value for the field: a list for a repeated one, a message for a message one."""
    one = message_values(field_.message_type, depth) if field_.type == T.TYPE_MESSAGE else scalar_values(field_)
    if field_.is_repeated:
        return st.lists(one, max_size=MAX_REPEATED.get(field_.full_name, 4))
    return one


def assign(message: Message, field_: FieldDescriptor, value) -> None:
    """Sets a field of `message` to `value` (a list for repeated fields), replacing what it held."""
    message.ClearField(field_.name)
    if field_.is_repeated:
        container = getattr(message, field_.name)
        if field_.type == T.TYPE_MESSAGE:
            for item in value:
                container.add().CopyFrom(item)
        else:
            container.extend(value)
    elif field_.type == T.TYPE_MESSAGE:
        getattr(message, field_.name).CopyFrom(value)
    else:
        setattr(message, field_.name, value)


@st.composite
def messages(draw, cls: type[Message], depth: int = 0) -> Message:
    """A message of `cls` with each field set or not: every scalar type, enum (unknown values
    too), repeated, oneof member and nested message, down to MAX_DEPTH."""
    message = cls()
    descriptor = cls.DESCRIPTOR
    in_oneof = set()
    for oneof in real_oneofs(descriptor):
        in_oneof.update(f.name for f in oneof.fields)
        chosen = draw(st.sampled_from([None, *oneof.fields]))
        if chosen is not None:
            assign(message, chosen, draw(field_values(chosen, depth)))
    for field_ in descriptor.fields:
        if field_.name not in in_oneof and draw(st.booleans()):
            assign(message, field_, draw(field_values(field_, depth)))
    return message


# -- one field of a valid request changed --------------------------------------------------------


@dataclass
class Site:
    """A place in a message a mutation can change: a field of `owner`, or one element of it."""

    template: str  # the field's path with indices left out: layers[].values[].data
    path: str  # the concrete path: layers[2].values[0].data
    owner: Message
    field: FieldDescriptor
    index: int | None = None


def sites(message: Message, template: str = "", path: str = "") -> Iterator[Site]:
    for field_ in message.DESCRIPTOR.fields:
        name_t, name_p = template + field_.name, path + field_.name
        yield Site(name_t, name_p, message, field_)
        if field_.is_repeated:
            for i, item in enumerate(getattr(message, field_.name)):
                yield Site(name_t + "[]", f"{name_p}[{i}]", message, field_, i)
                if field_.type == T.TYPE_MESSAGE:
                    yield from sites(item, name_t + "[].", f"{name_p}[{i}].")
        elif field_.type == T.TYPE_MESSAGE and message.HasField(field_.name):
            yield from sites(getattr(message, field_.name), name_t + ".", name_p + ".")


def near_values(field_: FieldDescriptor, current) -> st.SearchStrategy:
    """Values next to `current` (off by one, doubled, negated) where the type has them, else any."""
    if field_.type in _INT_RANGES and isinstance(current, int):
        lo, hi = _INT_RANGES[field_.type]
        near = [v for v in (current - 1, current + 1, current * 2, -current, current + 2**32) if lo <= v <= hi]
        return st.one_of(st.sampled_from(near or [lo]), scalar_values(field_))
    return scalar_values(field_)


_POKES = {"float": (math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 2.0, 1e30, 3e38, 1e-40),
          "int": (-1, 0, 1, 2**31, 2**62, 2**63 - 1, -(2**63))}


@st.composite
def changed_tensor(draw, tensor: tensor_pb2.Tensor) -> str:
    """Changes one thing of a tensor in place (one value, the length of its data, its dtype or
    shape); returns what was done."""
    action = draw(st.sampled_from(["poke", "truncate", "extend", "empty", "dtype", "shape", "replace"]))
    if action == "poke":
        try:
            values = np.array(wire.decode(tensor, "t"), dtype=np.float64)
        except (wire.WireError, ValueError):
            values = np.zeros(0)
        if values.size:
            flat = values.reshape(-1)
            i = draw(st.integers(0, flat.size - 1))
            if tensor.dtype in (tensor_pb2.DTYPE_INT32, tensor_pb2.DTYPE_INT64):
                choices = _POKES["int"] + ((float(flat[i - 1]),) if i else ())  # a repeated position
            else:
                choices = _POKES["float"]
            flat[i] = draw(st.sampled_from(choices))
            tensor.data = encode_like(flat, tensor.dtype)
            return f"poke[{i}]={flat[i]!r}"
        action = "truncate"
    if action == "truncate" and tensor.data:
        cut = draw(st.integers(1, len(tensor.data)))
        tensor.data = tensor.data[:-cut]
        return f"truncate-{cut}"
    if action == "extend":
        tensor.data += draw(st.binary(min_size=1, max_size=9))
        return "extend"
    if action == "dtype":
        tensor.dtype = draw(enum_values(tensor_pb2.DType.DESCRIPTOR))
        return f"dtype={tensor.dtype}"
    if action == "shape":
        shape = list(tensor.shape)
        how = draw(st.sampled_from(["reverse", "append", "drop", "grow", "shrink", "edge", "zero"]))
        i = draw(st.integers(0, max(0, len(shape) - 1)))
        if how == "reverse":
            shape.reverse()
        elif how == "append":
            shape.append(draw(st.sampled_from([0, 1, 2])))
        elif how == "drop" and shape:
            shape.pop(i)
        elif how in ("grow", "shrink") and shape:
            shape[i] += 1 if how == "grow" else -1
        elif how == "edge" and shape:
            shape[i] = draw(st.sampled_from(_DIM_EDGES))
        else:
            shape.insert(0, 0)
        tensor.ClearField("shape")
        tensor.shape.extend(shape)
        return f"shape={shape}"
    if action == "empty":
        tensor.data = b""
        return "empty"
    tensor.CopyFrom(draw(tensors()))
    return "replace"


@st.composite
def mutated(draw, original: Message) -> tuple[Message, str]:
    """A copy of `original` with one field changed (set to a neighbouring or adversarial value,
    cleared, an element added, dropped or replaced, one tensor damaged); and what was changed.
    Each field (path without indices) is equally likely, then one of its places."""
    message = type(original).FromString(original.SerializeToString())
    by_template: dict[str, list[Site]] = defaultdict(list)
    for site in sites(message):
        by_template[site.template].append(site)
    # The field by a PRNG seeded from a drawn number: hypothesis' own choices favour some indices
    # (it explores near earlier examples), and every field should be about equally likely.
    pick = random.Random(draw(st.integers(0, 2**32 - 1)))
    template = pick.choice(sorted(by_template))
    site = pick.choice(by_template[template])
    owner, field_, name = site.owner, site.field, site.field.name
    is_tensor = field_.type == T.TYPE_MESSAGE and field_.message_type.full_name == "kvevict.v1.Tensor"
    if site.index is not None:
        container = getattr(owner, name)
        action = draw(st.sampled_from(["change", "remove"]))
        if action == "remove":
            del container[site.index]
            return message, f"{site.path}: removed"
        if is_tensor:
            return message, f"{site.path}: {draw(changed_tensor(container[site.index]))}"
        if field_.type == T.TYPE_MESSAGE:
            container[site.index].CopyFrom(draw(message_values(field_.message_type, 1)))
            return message, f"{site.path}: replaced"
        container[site.index] = draw(near_values(field_, container[site.index]))
        return message, f"{site.path}: = {container[site.index]!r:.60}"
    if field_.is_repeated:
        container = getattr(owner, name)
        action = draw(st.sampled_from(["clear", "append", "pop", "duplicate", "reverse", "replace"]))
        if action == "append" or (action in ("pop", "duplicate", "reverse") and not len(container)):
            one = message_values(field_.message_type, 1) if field_.type == T.TYPE_MESSAGE else scalar_values(field_)
            value = draw(one)
            if field_.type == T.TYPE_MESSAGE:
                container.add().CopyFrom(value)
            else:
                container.append(value)
            return message, f"{site.path}: appended"
        if action == "pop":
            del container[len(container) - 1]
        elif action == "duplicate":
            if field_.type == T.TYPE_MESSAGE:
                container.add().CopyFrom(container[0])
            else:
                container.append(container[0])
        elif action == "reverse":
            items = list(container)
            assign(owner, field_, [type(i).FromString(i.SerializeToString()) if isinstance(i, Message) else i
                                   for i in reversed(items)])
        elif action == "clear":
            owner.ClearField(name)
        else:
            assign(owner, field_, draw(field_values(field_, 1)))
        return message, f"{site.path}: {action}"
    if field_.type == T.TYPE_MESSAGE:
        if is_tensor and owner.HasField(name) and draw(st.booleans()):
            return message, f"{site.path}: {draw(changed_tensor(getattr(owner, name)))}"
        if draw(st.booleans()):
            owner.ClearField(name)
            return message, f"{site.path}: cleared"
        assign(owner, field_, draw(message_values(field_.message_type, 1)))
        return message, f"{site.path}: replaced"
    if draw(st.integers(0, 5)) == 0:
        owner.ClearField(name)
        return message, f"{site.path}: cleared"
    value = draw(near_values(field_, getattr(owner, name)))
    setattr(owner, name, value)
    return message, f"{site.path}: = {value!r:.60}"


# -- raw bytes ----------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def raw_field(draw, descriptor: Descriptor) -> bytes:
    """One field on the wire, encoded by hand: a known or unknown number, any wire type (6 and 7
    do not exist), varints out of the field's range, lengths past the end, garbage payloads."""
    numbers = [f.number for f in descriptor.fields] + [99, 536870911, 0]
    number = draw(st.sampled_from(numbers))
    wire_type = draw(st.integers(0, 7))
    tag = varint((number << 3) | wire_type)
    if wire_type == 0:
        return tag + varint(draw(st.sampled_from([0, 1, 2**31, 2**32, 2**63, 2**64 - 1, 300])))
    if wire_type == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    if wire_type == 2:
        payload = draw(binaries())
        length = draw(st.sampled_from([len(payload), len(payload) + 1, 2**31, 2**63]))
        return tag + varint(length) + payload
    return tag + draw(st.binary(max_size=8))  # groups (3, 4) and the wire types that do not exist


@st.composite
def raw_bytes(draw, rpc: Rpc, valid: bytes) -> tuple[bytes, str]:
    """Bytes for `rpc`: random, a valid request cut short or with a byte flipped, bytes inserted,
    or a hand-encoded field appended; and how they were made."""
    how = draw(st.sampled_from(["random", "truncate", "flip", "insert", "field", "overflow"]))
    if how == "random" or not valid:
        return draw(st.one_of(st.binary(max_size=96), st.sampled_from([b"\xff" * 11, b"\x0a\xff\xff\xff\xff\x0f",
                                                                     b"\x08", b"\x80" * 10 + b"\x01"]))), "random"
    if how == "truncate":
        cut = draw(st.integers(1, len(valid)))
        return valid[:-cut], f"truncate-{cut}"
    if how == "flip":
        i = draw(st.integers(0, len(valid) - 1))
        return valid[:i] + bytes([valid[i] ^ draw(st.integers(1, 255))]) + valid[i + 1:], f"flip[{i}]"
    if how == "insert":
        i = draw(st.integers(0, len(valid)))
        return valid[:i] + draw(st.binary(min_size=1, max_size=8)) + valid[i:], f"insert[{i}]"
    if how == "overflow":  # a varint of 11 bytes where a tag belongs
        return valid + b"\xff" * 10 + b"\x01", "overflow"
    return valid + draw(raw_field(rpc.request.DESCRIPTOR)), "field"


def decodes(rpc: Rpc, data: bytes) -> bool:
    try:
        rpc.request.FromString(data)
    except (DecodeError, ValueError):
        return False
    return True


# -- valid requests -----------------------------------------------------------------------------

BASES = ("h2o", "tova", "tova-mean", "snapkv", "keydiff", "streaming", "random", "valuenorm", "querycaote",
         "obcv", "obck", "obcvk", "laprox")
WRAPPERS = ("", "none", "caote", "fastcaote")
ALLOCATORS = ("", "uniform", "pyramid", "adaptive")
DTYPES = (tensor_pb2.DTYPE_UNSPECIFIED, tensor_pb2.DTYPE_BFLOAT16, tensor_pb2.DTYPE_FLOAT16,
          tensor_pb2.DTYPE_FLOAT32)


@st.composite
def policies(draw) -> pb.PolicySpec:
    policy = pb.PolicySpec(base=draw(st.sampled_from(BASES)), wrapper=draw(st.sampled_from(WRAPPERS)),
                           window=draw(st.sampled_from([0, 0, 1, 4, 8])), pool_kernel=draw(st.sampled_from([0, 1, 3])),
                           seed=draw(st.integers(0, 2**64 - 1)))
    if draw(st.booleans()):
        policy.sink_tokens = draw(st.integers(0, 4))
    if draw(st.booleans()):
        policy.recent_tokens = draw(st.integers(0, 6))
    return policy


@st.composite
def valid_opens(draw) -> pb.OpenSessionRequest:
    """OpenSession requests a manager should accept (some combinations are refused, named)."""
    kv_heads = draw(st.integers(1, 3))
    return pb.OpenSessionRequest(
        geometry=pb.ModelGeometry(num_layers=draw(st.integers(1, 3)), num_kv_heads=kv_heads,
                                  num_query_heads=kv_heads * draw(st.integers(1, 2)), head_dim=8),
        policy=draw(policies()),
        budget=pb.BudgetSpec(tokens=draw(st.integers(12, 40)), allocator=draw(st.sampled_from(ALLOCATORS))),
        block_size=draw(st.integers(1, 16)), statistics_dtype=draw(st.sampled_from(DTYPES)))


TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"


@st.composite
def prompt_texts(draw) -> str:
    start = draw(st.integers(0, len(TEXT) - 2))
    return (TEXT * 2)[start:start + draw(st.integers(2, 120))]


@st.composite
def evictions(draw) -> worker_pb2.EvictionOptions:
    options = worker_pb2.EvictionOptions(block_size=draw(st.sampled_from([0, 0, 2, 4, 8, 16])))
    if draw(st.booleans()):
        options.policy.CopyFrom(draw(policies()))
    if draw(st.booleans()):
        options.budget.CopyFrom(pb.BudgetSpec(tokens=draw(st.integers(8, 48)),
                                              allocator=draw(st.sampled_from(ALLOCATORS))))
    return options


@st.composite
def valid_generates(draw, vocab: int, continuing: bool = False) -> worker_pb2.GenerateRequest:
    """Generate requests a worker should serve (some policies do not fit the model: refused,
    named). `continuing`: the next turn of the case's kept conversation."""
    request = worker_pb2.GenerateRequest(max_new_tokens=draw(st.integers(0, 8)))
    kind = draw(st.sampled_from(["text", "token_ids"] if continuing else ["text", "token_ids", "chat"]))
    if kind == "text":
        request.text = draw(prompt_texts())
    elif kind == "token_ids":
        request.token_ids.ids.extend(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=60)))
    else:
        roles = st.sampled_from(["system", "user", "assistant"])
        for _ in range(draw(st.integers(1, 3))):
            request.chat.messages.add(role=draw(roles), content=draw(prompt_texts()))
    if continuing:
        request.conversation_id = CONVERSATION
    elif draw(st.booleans()):
        request.eviction.CopyFrom(draw(evictions()))
    if draw(st.booleans()):
        request.sampling.CopyFrom(worker_pb2.SamplingOptions(
            temperature=draw(st.sampled_from([0.0, 0.7, 1.0, 1.5])), top_p=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
            seed=draw(st.integers(0, 2**64 - 1))))
    if draw(st.integers(0, 3)) == 0:
        request.stop.append(draw(st.sampled_from(["\n", "return", "(", "self", "zzz"])))
    request.keep_conversation = continuing and draw(st.booleans())
    return request


@st.composite
def valid_scores(draw, vocab: int) -> worker_pb2.ScoreRequest:
    request = worker_pb2.ScoreRequest()
    if draw(st.booleans()):
        request.text = draw(prompt_texts())
    else:
        request.token_ids.ids.extend(draw(st.lists(st.integers(0, vocab - 1), min_size=2, max_size=80)))
    if draw(st.booleans()):
        request.eviction.CopyFrom(draw(evictions()))
    return request


# -- cases: steps, and what the in-process manager says to them -----------------------------------


@dataclass
class Step:
    """One call of a case. `data` is sent as is (identity serializers), with SESSION and
    CONVERSATION replaced by the ids the servers gave earlier in the case.

    role: "setup" must be OK; "fuzz" is what the case is about; "teardown" cleans up.
    expected: the status an in-process ManagerCore gave for the same call (manager calls), and
    its answer's bytes when OK (ids as the placeholders).
    """

    method: str
    data: bytes
    role: str = "fuzz"
    what: str = ""
    expected: str | None = None
    expected_response: bytes | None = None

    @property
    def rpc(self) -> Rpc:
        return RPCS[self.method]

    @property
    def undecodable(self) -> bool:
        return not decodes(self.rpc, self.data)

    def request_text(self, limit: int = 300) -> str:
        """The request in protobuf text format (its bytes in hex when they do not decode), cut."""
        try:
            text = text_format.MessageToString(self.rpc.request.FromString(self.data), as_one_line=True)
        except (DecodeError, ValueError):
            text = f"undecodable {self.data.hex()}"
        return text if len(text) <= limit else f"{text[:limit]}... ({len(self.data)} B)"

    def to_json(self) -> dict:
        return {"method": self.method, "data": base64.b64encode(self.data).decode(), "role": self.role,
                "what": self.what, "expected": self.expected}

    @classmethod
    def from_json(cls, item: dict) -> Step:
        return cls(item["method"], base64.b64decode(item["data"]), item.get("role", "fuzz"), item.get("what", ""),
                   item.get("expected"))


@dataclass
class Case:
    kind: str
    steps: list[Step] = field(default_factory=list)

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example: short
        return f"Case({self.kind!r}, {[f'{s.method}:{s.role}:{s.what}:{len(s.data)}B' for s in self.steps]})"

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # hypothesis' printer would list every byte
        printer.text(repr(self))

    def to_json(self) -> dict:
        return {"kind": self.kind, "steps": [s.to_json() for s in self.steps]}


class Oracle:
    """An in-process ManagerCore with the server's limits, fed the same calls as the remote
    manager, whose sessions are all named SESSION."""

    def __init__(self) -> None:
        from kvevict.cache_manager import InMemoryStateStore, ManagerCore
        from kvevict.cache_manager.server import ServerConfig

        self.core = ManagerCore(InMemoryStateStore(), new_session_id=lambda: SESSION,
                                max_state_bytes=ServerConfig().max_session_bytes)

    def call(self, method: str, data: bytes) -> tuple[str, Message | None]:
        from kvevict.cache_manager.errors import ManagerError
        from kvevict.cache_manager.server import status_code

        rpc = RPCS[method]
        try:
            request = rpc.request.FromString(data)
        except (DecodeError, ValueError):
            return "INVALID_ARGUMENT", None
        handler = getattr(self.core, re.sub(r"(?<!^)([A-Z])", r"_\1", method).lower())
        try:
            return "OK", handler(request)
        except ManagerError as error:
            return status_code(error).name, None
        except Exception as error:  # a bug in the domain code: what the server must not answer
            return f"INTERNAL ({type(error).__name__}: {error})"[:200], None


class CaseBuilder:
    """Appends steps, asking the oracle about manager calls as they are added."""

    def __init__(self, kind: str) -> None:
        self.case = Case(kind)
        self.oracle = Oracle()

    def add(self, method: str, request: Message | bytes, role: str = "fuzz", what: str = "") -> tuple[str | None, Message | None]:
        data = request if isinstance(request, bytes) else request.SerializeToString()
        step = Step(method, data, role, what)
        answer = None
        if RPCS[method].on_manager:
            step.expected, answer = self.oracle.call(method, data)
            step.expected_response = None if answer is None else answer.SerializeToString()
        self.case.steps.append(step)
        return step.expected, answer

    def close(self) -> None:
        self.add("CloseSession", pb.CloseSessionRequest(session_id=SESSION), "teardown")


@st.composite
def report_session(draw, builder: CaseBuilder, reports: int):
    """A valid session opened (setup) and `reports` valid reports; the helper that builds the
    next one, or None when the manager refused the session."""
    from tests.test_manager_support import Session

    request = draw(valid_opens())
    code, opened = builder.add("OpenSession", request, "fuzz", "valid open")
    if code != "OK":  # a combination the manager refuses: judged against the oracle like any call
        return None
    builder.case.steps[-1].role = "setup"
    geometry = request.geometry
    session = Session(builder.oracle.core, opened, np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
                      num_layers=geometry.num_layers, heads=geometry.num_kv_heads)
    for _ in range(reports):
        report, _ = session.build(draw(st.integers(1, 30)), draw(st.sampled_from([pb.PHASE_PREFILL, pb.PHASE_DECODE])))
        code, answer = builder.add("ReportBlock", report, "fuzz", "valid report")
        if code != "OK":  # the oracle refused it: the remote manager must too, and that is all
            return None
        builder.case.steps[-1].role = "setup"
        session.apply(report, answer)
    return session


@st.composite
def open_generated(draw) -> Case:
    builder = CaseBuilder("OpenSession from the descriptor")
    if builder.add("OpenSession", draw(messages(pb.OpenSessionRequest)))[0] == "OK":
        builder.close()
    return builder.case


@st.composite
def open_mutated(draw) -> Case:
    builder = CaseBuilder("OpenSession, one field changed")
    request, what = draw(mutated(draw(valid_opens())))
    if builder.add("OpenSession", request, what=what)[0] == "OK":
        builder.close()
    return builder.case


@st.composite
def report_generated(draw) -> Case:
    builder = CaseBuilder("ReportBlock from the descriptor")
    session = draw(report_session(builder, draw(st.integers(0, 1))))
    report = draw(messages(pb.ReportBlockRequest))
    if draw(st.integers(0, 3)):
        report.session_id = SESSION
    builder.add("ReportBlock", report)
    if session is not None:
        builder.close()
    return builder.case


@st.composite
def report_mutated(draw) -> Case:
    """A session with 0-2 valid reports, the next report with one field changed, then that
    report unchanged (the session must go on as if the bad one never came), then a GetSession."""
    builder = CaseBuilder("ReportBlock, one field changed")
    session = draw(report_session(builder, draw(st.integers(0, 2))))
    if session is None:
        return builder.case
    good, _ = session.build(draw(st.integers(1, 30)), draw(st.sampled_from([pb.PHASE_PREFILL, pb.PHASE_DECODE])))
    bad, what = draw(mutated(good))
    builder.add("ReportBlock", bad, what=what)
    builder.add("ReportBlock", good, "fuzz", "the same report unchanged")
    builder.add("GetSession", pb.GetSessionRequest(session_id=SESSION), "fuzz", "after")
    builder.close()
    return builder.case


@st.composite
def session_call_generated(draw, method: str) -> Case:
    builder = CaseBuilder(f"{method} from the descriptor")
    session = draw(report_session(builder, 1)) if method != "ListPolicies" and draw(st.booleans()) else None
    builder.add(method, draw(messages(RPCS[method].request)))
    if session is not None:
        builder.close()
    return builder.case


@st.composite
def session_call_mutated(draw, method: str) -> Case:
    builder = CaseBuilder(f"{method}, one field changed")
    session = draw(report_session(builder, draw(st.integers(0, 1))))
    request, what = draw(mutated(RPCS[method].request(session_id=SESSION)))
    builder.add(method, request, what=what)
    if session is not None:
        builder.close()
    return builder.case


@st.composite
def worker_generated(draw, method: str, vocab: int) -> Case:
    """One Generate or Score request generated field by field from its descriptor."""
    builder = CaseBuilder(f"{method} from the descriptor")
    builder.add(method, draw(messages(RPCS[method].request)))
    return builder.case


@st.composite
def worker_mutated(draw, method: str, vocab: int) -> Case:
    """A valid Generate or Score request with one field changed."""
    builder = CaseBuilder(f"{method}, one field changed")
    valid = valid_generates(vocab) if method == "Generate" else valid_scores(vocab)
    request, what = draw(mutated(draw(valid)))
    builder.add(method, request, what=what)
    return builder.case


@st.composite
def conversation_mutated(draw, vocab: int) -> Case:
    """A turn that keeps its conversation, the next turn with one field changed, then the
    conversation ended (NOT_FOUND if the changed turn already let it go)."""
    builder = CaseBuilder("Generate, next turn of a conversation, one field changed")
    first = worker_pb2.GenerateRequest(text=draw(prompt_texts()), max_new_tokens=draw(st.integers(1, 6)),
                                       keep_conversation=True)
    if draw(st.booleans()):  # settings every model serves
        first.eviction.CopyFrom(worker_pb2.EvictionOptions(
            policy=pb.PolicySpec(base=draw(st.sampled_from(["tova", "h2o", "snapkv", "streaming"])),
                                 wrapper=draw(st.sampled_from(["", "caote"]))),
            budget=pb.BudgetSpec(tokens=draw(st.integers(16, 48))), block_size=8))
    builder.add("Generate", first, "setup", "keeps its conversation")
    request, what = draw(mutated(draw(valid_generates(vocab, continuing=True))))
    builder.add("Generate", request, what=what)
    builder.add("Generate", worker_pb2.GenerateRequest(conversation_id=CONVERSATION, end_conversation=True), "teardown")
    return builder.case


@st.composite
def valid_request_bytes(draw, method: str, vocab: int) -> bytes:
    """A valid request of `method` serialized (the starting point of the raw corruptions)."""
    if method == "OpenSession":
        return draw(valid_opens()).SerializeToString()
    if method == "ReportBlock":
        from kvevict.cache_manager.errors import ManagerError
        from tests.test_manager_support import Session

        request = draw(valid_opens())
        try:
            opened = Oracle().core.open_session(request)
        except ManagerError:
            return pb.ReportBlockRequest(session_id=SESSION, sequence=1, phase=pb.PHASE_PREFILL).SerializeToString()
        session = Session(None, opened, np.random.default_rng(0), num_layers=request.geometry.num_layers,
                          heads=request.geometry.num_kv_heads)
        return session.build(draw(st.integers(1, 20)))[0].SerializeToString()
    if method in ("GetSession", "CloseSession"):
        return RPCS[method].request(session_id=SESSION).SerializeToString()
    if method == "ListPolicies":
        return b""
    if method == "Generate":
        return draw(valid_generates(vocab)).SerializeToString()
    return draw(valid_scores(vocab)).SerializeToString()


@st.composite
def raw_case(draw, method: str, vocab: int, decodable: bool | None = None) -> Case:
    """Raw bytes to `method`; `decodable` True / False keeps only bytes that do / do not decode
    as the method's request (None: either)."""
    builder = CaseBuilder(f"{method}, raw bytes")
    data, what = draw(raw_bytes(RPCS[method], draw(valid_request_bytes(method, vocab))))
    if decodable is False and decodes(RPCS[method], data):
        data, what = data + b"\x0f", what + "+bad-tag"  # field 1 of wire type 7: cannot be parsed
    assume(decodable is None or decodes(RPCS[method], data) == decodable)
    code, _ = builder.add(method, data, what=what)
    if code == "OK" and method == "OpenSession":
        builder.close()
    return builder.case


# Every kind of case: "<how>:<RPC>". Each RPC gets requests generated from its descriptor,
# valid ones with one field changed (ListPolicies has no field to change) and raw bytes.
KINDS: dict[str, Callable[[int], st.SearchStrategy[Case]]] = {
    "generated:OpenSession": lambda vocab: open_generated(),
    "generated:ReportBlock": lambda vocab: report_generated(),
    "generated:CloseSession": lambda vocab: session_call_generated("CloseSession"),
    "generated:GetSession": lambda vocab: session_call_generated("GetSession"),
    "generated:ListPolicies": lambda vocab: session_call_generated("ListPolicies"),
    "generated:Generate": lambda vocab: worker_generated("Generate", vocab),
    "generated:Score": lambda vocab: worker_generated("Score", vocab),
    "mutated:OpenSession": lambda vocab: open_mutated(),
    "mutated:ReportBlock": lambda vocab: report_mutated(),
    "mutated:CloseSession": lambda vocab: session_call_mutated("CloseSession"),
    "mutated:GetSession": lambda vocab: session_call_mutated("GetSession"),
    "mutated:Generate": lambda vocab: worker_mutated("Generate", vocab),
    "mutated:Generate(conversation)": conversation_mutated,
    "mutated:Score": lambda vocab: worker_mutated("Score", vocab),
    **{f"raw:{method}": (lambda vocab, method=method: raw_case(method, vocab)) for method in RPCS},
}
# The benchmark's mix, in cases per round: changed fields reach the deepest checks, and the
# manager's calls are cheap where the worker's run the model.
BENCHMARK_WEIGHTS = {kind: 2 if kind.startswith("mutated:") else 1 for kind in KINDS}
BENCHMARK_WEIGHTS["mutated:ReportBlock"] = 4


def cases(kind: str, vocab: int) -> st.SearchStrategy[Case]:
    return KINDS[kind](vocab)


# -- servers and calls --------------------------------------------------------------------------

WORKER_READY = re.compile(r"event=worker\.ready .*\bport=(\d+)")
WORKER_LIMITS = ("--max-queue", "4", "--max-prompt-tokens", "128", "--max-new-tokens-limit", "12",
                 "--default-max-new-tokens", "4", "--max-conversations", "8", "--conversation-ttl", "120",
                 "--policy", "caote+tova", "--budget", "32", "--block-size", "8", "--threads", "1")


@dataclass
class Result:
    method: str
    code: str
    details: str
    seconds: float
    response: bytes = b""  # the answer (Generate: its last message)


@dataclass
class Failure:
    case: Case
    step: int | None  # None: the servers after the case
    reason: str
    code: str = ""
    details: str = ""

    def describe(self) -> str:
        where = "after the case" if self.step is None else (
            f"step {self.step} {self.case.steps[self.step].method} ({self.case.steps[self.step].what or self.case.steps[self.step].role})")
        return f"{self.case.kind}: {where}: {self.reason}" + (f" [{self.code}: {self.details[:160]}]" if self.code else "")


class Servers:
    """redis-server, `kvevict manager serve` on it and `kvevict worker serve` on a tiny checkpoint
    using that manager; `run(case)` sends a case's steps, `health()` says what is wrong."""

    def __init__(self, directory: Path) -> None:
        from tests.checkpoints import save_tiny_checkpoint

        self.directory = Path(directory)
        self.redis = RedisServer(self.directory / "redis").start()
        self.checkpoint = save_tiny_checkpoint(self.directory / "tiny", chat_template=True)
        self.manager = start_manager(self.redis.url)
        self.worker = ServerProcess(
            [sys.executable, "-m", "kvevict.cli", "worker", "serve", "--port", "0", "--metrics-port", "0",
             "--model", str(self.checkpoint), "--manager", self.manager.address, "--no-fail-open",
             "--manager-timeout", "20", "--manager-retries", "1", *WORKER_LIMITS], WORKER_READY, name="worker")
        self.worker.wait_ready(180)
        self.vocab = int(re.search(r"\bvocab=(\d+)", self.worker.match.string).group(1))
        self.channels = {RPCS["OpenSession"].service: channel(self.manager.address),
                         RPCS["Generate"].service: channel(f"127.0.0.1:{self.worker.match.group(1)}")}
        self._calls: dict[str, Callable] = {}

    def close(self) -> None:
        for chan in self.channels.values():
            chan.close()
        self.worker.kill()
        self.manager.kill()
        self.redis.stop()

    @classmethod
    @contextlib.contextmanager
    def started(cls, directory: Path) -> Iterator[Servers]:
        servers = cls(directory)
        try:
            yield servers
        finally:
            servers.close()

    def call(self, method: str, data: bytes, timeout_s: float = TIMEOUT_S) -> Result:
        """Sends `data` as it is (no serializer) and returns the status and raw answer."""
        rpc = RPCS[method]
        if method not in self._calls:
            chan = self.channels[rpc.service]
            make = chan.unary_stream if rpc.streaming else chan.unary_unary
            self._calls[method] = make(rpc.path, request_serializer=None, response_deserializer=None)
        started = time.perf_counter()
        try:
            if rpc.streaming:
                answers = list(self._calls[method](data, timeout=timeout_s))
                response = answers[-1] if answers else b""
            else:
                response = self._calls[method](data, timeout=timeout_s)
            return Result(method, "OK", "", time.perf_counter() - started, response)
        except grpc.RpcError as error:
            return Result(method, error.code().name, error.details() or "", time.perf_counter() - started)

    def run(self, case: Case) -> list[Result]:
        """The case's steps in order, placeholders replaced by the ids the servers gave; kept
        conversations the case did not end are ended after it (not judged)."""
        ids: dict[str, str] = {}
        results = []
        conversations: list[str] = []
        for step in case.steps:
            data = step.data
            for placeholder, name in ((SESSION, "session"), (CONVERSATION, "conversation")):
                if name in ids:
                    data = data.replace(placeholder.encode(), ids[name].encode())
            result = self.call(step.method, data)
            results.append(result)
            if result.code == "OK" and result.response:
                if step.method == "OpenSession" and "session" not in ids:
                    ids["session"] = pb.OpenSessionResponse.FromString(result.response).session_id
                elif step.method == "Generate":
                    kept = worker_pb2.GenerateResponse.FromString(result.response).conversation_id
                    if kept:
                        ids.setdefault("conversation", kept)
                        conversations.append(kept)
        for kept in conversations:  # a case leaves no conversation behind (NOT_FOUND if it ended it)
            self.call("Generate", worker_pb2.GenerateRequest(conversation_id=kept, end_conversation=True).SerializeToString())
        for name, placeholder in (("session", SESSION), ("conversation", CONVERSATION)):
            if name in ids:  # answers compare with the oracle's under the placeholder names
                for result in results:
                    result.response = result.response.replace(ids[name].encode(), placeholder.encode())
        return results

    def health(self) -> list[str]:
        """What is wrong with the servers: a process gone, health not SERVING."""
        problems = []
        for name, process, service in (("manager", self.manager, RPCS["OpenSession"].service),
                                       ("worker", self.worker, RPCS["Generate"].service)):
            if process.process.poll() is not None:
                problems.append(f"{name} exited with {process.process.returncode}")
                continue
            try:
                status = health_pb2_grpc.HealthStub(self.channels[service]).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10).status
            except grpc.RpcError as error:
                problems.append(f"{name} health check failed: {error.code().name} {error.details()}")
                continue
            if status != health_pb2.HealthCheckResponse.SERVING:
                problems.append(f"{name} health {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
        return problems


def judge(case: Case, results: list[Result]) -> list[Failure]:
    """Every way the case's answers break the rules (see the module's docstring)."""
    failures = []
    for i, (step, result) in enumerate(zip(case.steps, results)):
        def fail(reason: str) -> None:
            failures.append(Failure(case, i, reason, result.code, result.details))

        if result.code not in ALLOWED:
            fail(f"status {result.code} is not one a client can act on")
        elif TRANSPORT_LOST.search(result.details):
            fail("the server's status never reached the client (gRPC dropped the call)")
        elif step.undecodable and result.code != "INVALID_ARGUMENT":
            fail("undecodable request bytes must be INVALID_ARGUMENT")
        elif step.role == "setup" and result.code != "OK":
            fail("a valid setup call failed")
        elif step.expected is not None and result.code != step.expected:
            fail(f"in-process ManagerCore says {step.expected}")
        elif (step.expected_response is not None and result.code == "OK"
              and result.response != step.expected_response):
            fail("answer differs from the in-process ManagerCore's")
    return failures


def check_servers(servers: Servers, case: Case) -> list[Failure]:
    return [Failure(case, None, problem) for problem in servers.health()]


# -- a well-formed generation alongside ----------------------------------------------------------

COMPANION = worker_pb2.GenerateRequest(
    text=TEXT * 2, max_new_tokens=12,
    eviction=worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="h2o", wrapper="caote", sink_tokens=2),
                                        budget=pb.BudgetSpec(tokens=16), block_size=8),
    sampling=worker_pb2.SamplingOptions(temperature=1.0, top_p=0.9, seed=11))


def stream_bytes(servers: Servers, request: worker_pb2.GenerateRequest) -> bytes:
    """Everything a Generate call streams, each message with its timings cleared (they measure
    this run), concatenated; raises on a failed call."""
    rpc = RPCS["Generate"]
    call = servers.channels[rpc.service].unary_stream(rpc.path, request_serializer=None, response_deserializer=None)
    out = []
    for data in call(request.SerializeToString(), timeout=TIMEOUT_S):
        message = worker_pb2.GenerateResponse.FromString(data)
        for name in ("prefill_seconds", "decode_seconds", "manager_seconds"):
            message.summary.ClearField(name)
        out.append(message.SerializeToString())
    return b"".join(len(m).to_bytes(4, "little") + m for m in out)


class Companion:
    """Generates COMPANION again and again in a thread while the fuzzing runs; every run must
    stream what the run alone (before any fuzzing, twice, to be sure it is deterministic) did."""

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.reference = stream_bytes(servers, COMPANION)
        if stream_bytes(servers, COMPANION) != self.reference:
            raise RuntimeError("the companion generation is not deterministic on its own")
        self.runs = 0
        self.mismatches: list[str] = []
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="companion")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                got = stream_bytes(self.servers, COMPANION)
                problem = None if got == self.reference else "streamed other bytes than alone"
            except grpc.RpcError as error:
                problem = f"failed: {error.code().name} {error.details()}"
            with self._changed:
                self.runs += 1
                if problem:
                    self.mismatches.append(f"run {self.runs}: {problem}")
                self._changed.notify_all()

    def start(self) -> Companion:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT_S * 2)

    def wait_for_run_after(self, runs: int, timeout_s: float = 120.0) -> None:
        """Blocks until a run that started after `runs` runs had ended is done."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.runs < runs + 2 and time.monotonic() < deadline:  # +2: the one running may predate
                self._changed.wait(1.0)
        if self.runs < runs + 2:
            raise TimeoutError(f"no companion generation finished within {timeout_s} s")

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Around a fuzz run: afterwards, a run overlapping it finished, and no run differed."""
        before = self.runs
        yield
        self.wait_for_run_after(before)
        assert not self.mismatches, "the generation alongside changed:\n" + "\n".join(self.mismatches[:5])


# -- the benchmark ------------------------------------------------------------------------------


@dataclass
class Tally:
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    kinds: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    requests: int = 0

    def add(self, case: Case, results: list[Result], failures: list[Failure]) -> None:
        self.kinds[case.kind] += 1
        for result in results:
            self.counts[result.method][result.code] += 1
            self.seconds[result.method].append(result.seconds)
        self.requests += len(results)
        self.failures.extend(failures)


def fuzz_batch(servers: Servers, strategy: st.SearchStrategy[Case], examples: int, seed: int, tally: Tally,
               stop_at: int) -> None:
    """`examples` cases drawn by hypothesis from `seed` (generation only: nothing is shrunk, a
    failure is recorded and the run goes on)."""
    @settings(max_examples=examples, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=False)
    @hypothesis_seed(seed)
    @given(strategy)
    def batch(case: Case) -> None:
        if tally.requests >= stop_at:
            return
        results = servers.run(case)
        tally.add(case, results, judge(case, results) + check_servers(servers, case))

    batch()


def counts_table(tally: Tally) -> str:
    codes = sorted({code for counter in tally.counts.values() for code in counter},
                   key=lambda c: (c not in ALLOWED, c != "OK", c))
    rows = []
    for method in RPCS:
        counter = tally.counts.get(method, Counter())
        seconds = [s * 1e3 for s in tally.seconds.get(method, [])]
        rows.append([method, sum(counter.values()), *[counter.get(c, 0) for c in codes],
                     percentile(seconds, 50), percentile(seconds, 99)])
    total = Counter()
    for counter in tally.counts.values():
        total.update(counter)
    every = [s * 1e3 for v in tally.seconds.values() for s in v]
    rows.append(["**all**", sum(total.values()), *[total.get(c, 0) for c in codes],
                 percentile(every, 50), percentile(every, 99)])
    return markdown(["RPC", "requests", *codes, "p50 ms", "p99 ms"], rows)


def kinds_table(tally: Tally) -> str:
    return markdown(["case", "cases"], sorted(tally.kinds.items(), key=lambda kv: -kv[1]))


def _pattern(details: str) -> str:
    """Details with names and numbers blanked, so that one bug's failures group together."""
    details = re.sub(r"'[^']*'?", "'…'", details)
    return re.sub(r"\d+", "N", details)[:90]


def failures_text(failures: list[Failure], path: Path) -> str:
    """The failures grouped by RPC, rule and status, each group with one request that shows it."""
    if not failures:
        return "No failures."
    groups: dict[tuple, list[Failure]] = defaultdict(list)
    for failure in failures:
        method = "" if failure.step is None else failure.case.steps[failure.step].method
        groups[(method, failure.reason, failure.code, _pattern(failure.details))].append(failure)
    rows = []
    for (method, reason, code, details), members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        example = members[0]
        request = "" if example.step is None else example.case.steps[example.step].request_text(160)
        rows.append([method or "(servers)", reason, f"{code} {details}".strip(), len(members),
                     f"{example.case.kind}: `{request}`".replace("|", "\\|")])
    return "\n\n".join([
        f"{len(failures)} failures. Every failing case is in `{path}`; `.venv/bin/python benchmarks/fuzz.py --replay "
        f"{path}` sends them again to fresh servers.",
        markdown(["RPC", "rule broken", "status seen", "failures", "example (case: request)"], rows)])


def log_errors(processes: dict[str, ServerProcess]) -> str:
    """Lines the servers logged at level=error or with a traceback, counted by event: a failure
    a call's status can hide (a background task, a log flood)."""
    rows = []
    for name, process in processes.items():
        events = Counter(re.search(r"\bevent=(\S+)", line).group(1) if "event=" in line else line[:80]
                         for line in process.lines(r"level=error|Traceback"))
        rows += [[name, event, count] for event, count in events.most_common()]
    return markdown(["server", "event", "lines"], rows) if rows else "None."


def run_benchmark(requests: int, seed: int, failures_path: Path, batch_size: int = 10) -> tuple[str, int]:
    """Fuzzes until `requests` calls were judged; the report (markdown) and the failure count."""
    started_load = load_line()
    with tempfile.TemporaryDirectory(prefix="kvevict-fuzz-") as directory, Servers.started(Path(directory)) as servers:
        companion = Companion(servers).start()
        meter = CpuMeter({"redis": servers.redis.process.pid, "manager": servers.manager.process.pid,
                          "worker": servers.worker.process.pid}).start()
        tally = Tally()
        rounds = [kind for kind, weight in BENCHMARK_WEIGHTS.items() for _ in range(weight)]
        wall, cpu = time.perf_counter(), time.process_time()
        batch = 0
        while tally.requests < requests:  # every kind in turn, each batch from its own seed
            kind = rounds[batch % len(rounds)]
            fuzz_batch(servers, cases(kind, servers.vocab), batch_size, seed * 1_000_003 + batch, tally, requests)
            batch += 1
            if batch % len(rounds) == 0:
                print(f"fuzz: {tally.requests} requests, {len(tally.failures)} failures", file=sys.stderr, flush=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        companion.stop()
        cpu_used = meter.stop() if not servers.health() else {}  # a process that died has no CPU to read
        logged = log_errors({"manager": servers.manager, "worker": servers.worker})
        for mismatch in companion.mismatches:
            tally.failures.append(Failure(Case("generation alongside"), None, mismatch))
    failures_path.write_text(json.dumps([{**f.case.to_json(), "failed_step": f.step, "reason": f.reason,
                                          "code": f.code, "details": f.details} for f in tally.failures], indent=1))
    times = markdown(["process", "CPU s"], [["fuzzing client (this process)", cpu],
                                            *[[name, seconds] for name, seconds in cpu_used.items()]])
    report = "\n\n".join([
        f"## Fuzzing: {tally.requests} requests, seed {seed}",
        f"`.venv/bin/python benchmarks/fuzz.py --requests {requests} --seed {seed}`: {sum(tally.kinds.values())} "
        f"cases in {wall:.0f} s wall ({tally.requests / wall:.0f} requests/s); {started_load} at the start, "
        f"{load_line()} at the end. {companion.runs} generations alongside, "
        f"{len(companion.mismatches)} differed from the run alone.",
        "### Status per RPC (latency: wall time of one call)", counts_table(tally),
        "### Cases", kinds_table(tally),
        "### CPU time", times,
        "### Errors in the servers' logs", logged,
        "### Failures", failures_text(tally.failures, failures_path),
    ])
    return report, len(tally.failures)


def replay(path: Path) -> int:
    """Sends each saved case's steps to fresh servers; prints each step's status; the count of
    steps that break the rules."""
    saved = json.loads(path.read_text())
    broken = 0
    with tempfile.TemporaryDirectory(prefix="kvevict-replay-") as directory, Servers.started(Path(directory)) as servers:
        for item in saved:
            case = Case(item["kind"], [Step.from_json(s) for s in item["steps"]])
            results = servers.run(case)
            failures = judge(case, results) + check_servers(servers, case)
            print(f"case {case.kind}:")
            for i, (step, result) in enumerate(zip(case.steps, results)):
                print(f"  {i} {step.method} ({step.role}, {step.what or '-'}, {len(step.data)} B): {result.code}"
                      f"{' ' + result.details[:200] if result.details else ''}")
            for failure in failures:
                print(f"  FAILED: {failure.describe()}")
            broken += len(failures)
    print(f"replay: {broken} failures")
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000, help="calls to judge (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generators (default 0)")
    parser.add_argument("--quick", action="store_true", help="300 requests (CI)")
    parser.add_argument("--failures", type=Path, default=Path(tempfile.gettempdir()) / "kvevict-fuzz-failures.json",
                        help="where failing cases are written (JSON)")
    parser.add_argument("--replay", type=Path, default=None, help="replay the cases of a failures file")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return 1 if replay(args.replay) else 0
    requests = 300 if args.quick else args.requests
    report, failures = run_benchmark(requests, args.seed, args.failures, batch_size=3 if args.quick else 10)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
