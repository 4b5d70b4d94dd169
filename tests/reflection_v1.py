"""A grpc.reflection.v1 client for the tests: grpc's own reflection client (a DescriptorDatabase)
calling `grpc.reflection.v1.ServerReflection` instead of v1alpha, and the checks both services
share: the services are listed, their files resolve (with every dependency) into a fresh pool,
and the served v1 file is the published grpc.reflection.v1 contract.

v1 and v1alpha messages are the same on the wire (same fields, numbers and types; V1_FIELDS is
the published v1 proto's), so v1alpha's message classes encode and decode the v1 calls.
"""

from __future__ import annotations

from types import SimpleNamespace

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_METHOD = f"/{V1_SERVICE}/ServerReflectionInfo"
# grpc/reflection/v1/reflection.proto (grpc-proto): message -> {field: number}.
V1_FIELDS = {
    "ServerReflectionRequest": {"host": 1, "file_by_filename": 3, "file_containing_symbol": 4,
                                "file_containing_extension": 5, "all_extension_numbers_of_type": 6,
                                "list_services": 7},
    "ExtensionRequest": {"containing_type": 1, "extension_number": 2},
    "ServerReflectionResponse": {"valid_host": 1, "original_request": 2, "file_descriptor_response": 4,
                                 "all_extension_numbers_response": 5, "list_services_response": 6,
                                 "error_response": 7},
    "FileDescriptorResponse": {"file_descriptor_proto": 1},
    "ExtensionNumberResponse": {"base_type_name": 1, "extension_number": 2},
    "ListServiceResponse": {"service": 1},
    "ServiceResponse": {"name": 1},
    "ErrorResponse": {"error_code": 1, "error_message": 2},
}


class ReflectionV1Database(ProtoReflectionDescriptorDatabase):
    """grpc's reflection client database, over grpc.reflection.v1."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self._stub = SimpleNamespace(ServerReflectionInfo=channel.stream_stream(
            V1_METHOD, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString))


def check_reflection_v1(channel: grpc.Channel, service: str, methods: set[str]) -> None:
    """Through v1 alone: `service`, health and both reflection versions are listed; `service`
    resolves with its methods, and the v1 reflection service with the published v1 messages."""
    database = ReflectionV1Database(channel)
    listed = set(database.get_services())
    assert {service, "grpc.health.v1.Health", V1_SERVICE, "grpc.reflection.v1alpha.ServerReflection"} <= listed
    pool = descriptor_pool.DescriptorPool(database)  # not the default pool: nothing compiled in
    assert {m.name for m in pool.FindServiceByName(service).methods} == methods
    reflection = pool.FindServiceByName(V1_SERVICE)
    assert reflection.file.name == "grpc/reflection/v1/reflection.proto"
    info = reflection.FindMethodByName("ServerReflectionInfo")
    assert info.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert info.output_type.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    served = {name: {f.name: f.number for f in message.fields}
              for name, message in reflection.file.message_types_by_name.items()}
    assert served == V1_FIELDS
    for message in reflection.file.message_types_by_name.values():  # no reference left to v1alpha
        assert all(f.message_type is None or f.message_type.full_name.startswith("grpc.reflection.v1.")
                   for f in message.fields)
