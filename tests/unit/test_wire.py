"""crivm.runtime.wire: joined field elements decode as the repeated field they stand for."""

from __future__ import annotations

from crivm.proto import api_pb2
from crivm.runtime import wire


def test_joined_elements_are_the_repeated_field() -> None:
    # Lengths around the varint boundaries (127/128, 16383/16384 bytes).
    items = [api_pb2.Container(id="c" * n) for n in (0, 1, 124, 125, 126, 16380, 16381, 70000)]
    joined = wire.Encoded(b"".join(wire.field_element(1, item) for item in items))
    decoded = api_pb2.ListContainersResponse.FromString(wire.serialize(joined))
    assert list(decoded.containers) == items
    assert type(wire.serialize(joined)) is bytes


def test_messages_are_serialized() -> None:
    response = api_pb2.VersionResponse(version="0.1.0", runtime_name="crivm")
    assert wire.serialize(response) == response.SerializeToString()
