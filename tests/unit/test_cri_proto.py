"""The committed CRI runtime.v1 code matches the published schema and its generator.

The expected names and numbers below are written out by hand from kubernetes/cri-api
(pkg/apis/runtime/v1/api.proto), so an accidental edit to proto/api.proto or a stale
regeneration fails here instead of on the wire with a real kubelet.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from crivm.proto import api_pb2, api_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]

RUNTIME_SERVICE_METHODS = [
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "StreamPodSandboxes",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "StreamContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "StreamContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "StreamPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "CheckpointPod",
    "RestorePod",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "StreamPodSandboxMetrics",
    "RuntimeConfig",
    "UpdatePodSandboxResources",
]

IMAGE_SERVICE_METHODS = [
    "ListImages",
    "StreamImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
]

SERVER_STREAMING_METHODS = {
    "StreamPodSandboxes",
    "StreamContainers",
    "StreamContainerStats",
    "StreamPodSandboxStats",
    "GetContainerEvents",
    "StreamPodSandboxMetrics",
    "StreamImages",
}

# (message, field) -> field number, from the published schema.
SPOT_FIELD_NUMBERS = {
    ("PodSandboxConfig", "metadata"): 1,
    ("PodSandboxConfig", "hostname"): 2,
    ("PodSandboxConfig", "log_directory"): 3,
    ("PodSandboxConfig", "dns_config"): 4,
    ("PodSandboxConfig", "port_mappings"): 5,
    ("PodSandboxConfig", "labels"): 6,
    ("PodSandboxConfig", "annotations"): 7,
    ("PodSandboxConfig", "linux"): 8,
    ("PodSandboxConfig", "windows"): 9,
    ("ContainerConfig", "metadata"): 1,
    ("ContainerConfig", "image"): 2,
    ("ContainerConfig", "command"): 3,
    ("ContainerConfig", "args"): 4,
    ("ContainerConfig", "envs"): 6,
    ("ContainerConfig", "mounts"): 7,
    ("ContainerConfig", "log_path"): 11,
    ("ContainerConfig", "tty"): 14,
    ("ContainerConfig", "linux"): 15,
    ("ContainerConfig", "CDI_devices"): 17,
    ("ContainerConfig", "stop_signal"): 18,
    ("LinuxContainerSecurityContext", "capabilities"): 1,
    ("LinuxContainerSecurityContext", "privileged"): 2,
    ("LinuxContainerSecurityContext", "namespace_options"): 3,
    ("LinuxContainerSecurityContext", "run_as_user"): 5,
    ("LinuxContainerSecurityContext", "readonly_rootfs"): 7,
    ("LinuxContainerSecurityContext", "no_new_privs"): 11,
    ("LinuxContainerSecurityContext", "run_as_group"): 12,
    ("LinuxContainerSecurityContext", "masked_paths"): 13,
    ("LinuxContainerSecurityContext", "readonly_paths"): 14,
    ("LinuxContainerSecurityContext", "seccomp"): 15,
    ("LinuxContainerSecurityContext", "apparmor"): 16,
    ("LinuxContainerSecurityContext", "supplemental_groups_policy"): 17,
    ("LinuxSandboxSecurityContext", "run_as_group"): 8,
    ("LinuxSandboxSecurityContext", "supplemental_groups_policy"): 11,
}


def _message(name: str) -> Descriptor:
    return api_pb2.DESCRIPTOR.message_types_by_name[name]


def test_package_is_runtime_v1() -> None:
    assert api_pb2.DESCRIPTOR.package == "runtime.v1"
    assert set(api_pb2.DESCRIPTOR.services_by_name) == {"RuntimeService", "ImageService"}


@pytest.mark.parametrize(
    ("service", "expected"),
    [("RuntimeService", RUNTIME_SERVICE_METHODS), ("ImageService", IMAGE_SERVICE_METHODS)],
)
def test_service_has_every_published_method(service: str, expected: list[str]) -> None:
    descriptor = api_pb2.DESCRIPTOR.services_by_name[service]
    assert [method.name for method in descriptor.methods] == expected
    assert descriptor.full_name == f"runtime.v1.{service}"


def test_streaming_shape_of_methods() -> None:
    for service in api_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            assert not method.client_streaming, method.full_name
            assert method.server_streaming == (method.name in SERVER_STREAMING_METHODS), (
                method.full_name
            )


def test_method_request_and_response_types() -> None:
    runtime = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
    get_events = runtime.methods_by_name["GetContainerEvents"]
    assert get_events.input_type.name == "GetEventsRequest"
    assert get_events.output_type.name == "ContainerEventResponse"
    run = runtime.methods_by_name["RunPodSandbox"]
    assert run.input_type.name == "RunPodSandboxRequest"
    assert run.output_type.name == "RunPodSandboxResponse"


@pytest.mark.parametrize(("message_and_field", "number"), sorted(SPOT_FIELD_NUMBERS.items()))
def test_spot_field_numbers(message_and_field: tuple[str, str], number: int) -> None:
    message, field = message_and_field
    assert _message(message).fields_by_name[field].number == number


def test_map_and_repeated_fields() -> None:
    labels = _message("PodSandboxConfig").fields_by_name["labels"]
    entry = labels.message_type
    assert entry is not None
    assert entry.GetOptions().map_entry
    assert entry.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
    assert entry.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING
    groups = _message("LinuxContainerSecurityContext").fields_by_name["supplemental_groups"]
    assert groups.type == FieldDescriptor.TYPE_INT64
    assert groups.is_repeated


def test_nested_enum_and_enum_values() -> None:
    profile_type = _message("SecurityProfile").enum_types_by_name["ProfileType"]
    assert {v.name: v.number for v in profile_type.values} == {
        "RuntimeDefault": 0,
        "Unconfined": 1,
        "Localhost": 2,
    }
    assert api_pb2.ContainerState.Value("CONTAINER_UNKNOWN") == 3
    assert api_pb2.NamespaceMode.Value("TARGET") == 3


def test_wire_round_trip_keeps_field_numbers() -> None:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="app", attempt=2),
        labels={"io.kubernetes.pod.name": "web"},
        linux=api_pb2.LinuxContainerConfig(
            security_context=api_pb2.LinuxContainerSecurityContext(
                run_as_user=api_pb2.Int64Value(value=1000), masked_paths=["/proc/kcore"]
            )
        ),
    )
    wire = config.SerializeToString()
    # Field 1 (metadata), length-delimited: tag byte 0x0a.
    assert wire[0] == 0x0A
    assert api_pb2.ContainerConfig.FromString(wire) == config


def test_generated_grpc_module_imports_package_absolute() -> None:
    source = (REPO_ROOT / "crivm" / "proto" / "api_pb2_grpc.py").read_text()
    assert "from crivm.proto import api_pb2" in source
    assert hasattr(api_pb2_grpc, "RuntimeServiceServicer")
    assert hasattr(api_pb2_grpc, "add_ImageServiceServicer_to_server")


async def test_genproto_check_passes() -> None:
    process = await asyncio.create_subprocess_exec(
        str(REPO_ROOT / "scripts" / "genproto"),
        "--check",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, output.decode(errors="replace")
