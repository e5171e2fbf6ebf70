"""crivm.runtime.rpc.image_messages: one cached element answers ImageStatus and ListImages."""

from __future__ import annotations

import dataclasses

from crivm.proto import api_pb2
from crivm.runtime.rpc import image_messages
from crivm.storage.catalog import ImageRecord

RECORD = ImageRecord(
    id="sha256:" + "a" * 64, manifest_digest="sha256:" + "b" * 64, index_digest="", size=1234,
    pinned=False, created_at=1, config={"config": {"User": "1000"}},
    layers=("sha256:" + "c" * 64,), repo_tags=("docker.io/library/busybox:latest",),
    repo_digests=("docker.io/library/busybox@sha256:" + "d" * 64,),
)


def test_both_responses_number_the_image_field_1() -> None:
    status = api_pb2.ImageStatusResponse.DESCRIPTOR.fields_by_name["image"]
    listed = api_pb2.ListImagesResponse.DESCRIPTOR.fields_by_name["images"]
    assert status.number == listed.number == image_messages.IMAGE_FIELD


def test_element_decodes_as_the_message_in_both_responses() -> None:
    element = image_messages.image_element(RECORD)
    expected = image_messages.image_message(RECORD)
    assert api_pb2.ImageStatusResponse.FromString(element).image == expected
    assert list(api_pb2.ListImagesResponse.FromString(element * 3).images) == [expected] * 3
    assert expected.uid.value == 1000


def test_a_new_record_is_encoded_anew() -> None:
    first = image_messages.image_element(RECORD)
    assert image_messages.image_element(RECORD) is first
    renamed = dataclasses.replace(RECORD, repo_tags=("docker.io/library/busybox:1.36",))
    decoded = api_pb2.ImageStatusResponse.FromString(image_messages.image_element(renamed))
    assert list(decoded.image.repo_tags) == ["docker.io/library/busybox:1.36"]
