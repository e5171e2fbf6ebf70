"""Status: the RuntimeReady and NetworkReady conditions, and every handler's features."""

from __future__ import annotations

import dataclasses
import json

from crivm.proto import api_pb2
from crivm.runtime import config as configmod
from crivm.runtime.backend import Readiness
from crivm.runtime.daemon import Daemon


async def handle(daemon: Daemon, request: api_pb2.StatusRequest) -> api_pb2.StatusResponse:
    runtime = daemon.handlers.get(daemon.config.default_runtime).readiness()
    network = _network_readiness(daemon)
    response = api_pb2.StatusResponse(
        status=api_pb2.RuntimeStatus(
            conditions=[_condition("RuntimeReady", runtime), _condition("NetworkReady", network)]
        )
    )
    for name, backend in daemon.handlers.backends.items():
        features = backend.features()
        response.runtime_handlers.add(
            name=name,
            features=api_pb2.RuntimeHandlerFeatures(
                recursive_read_only_mounts=features.recursive_read_only_mounts,
                user_namespaces=features.user_namespaces,
            ),
        )
    if request.verbose:
        handlers = {
            name: {
                "runtime_type": backend.runtime_type,
                **dataclasses.asdict(backend.readiness()),
                **backend.details(),
            }
            for name, backend in daemon.handlers.backends.items()
        }
        response.info["config"] = configmod.to_toml(daemon.config)
        response.info["handlers"] = json.dumps(handlers)
        response.info["podCIDR"] = daemon.store.get_setting("pod_cidr")
    return response


def _network_readiness(daemon: Daemon) -> Readiness:
    network = daemon.components.get("network")
    if network is None:
        return Readiness(
            False, "NetworkPluginNotReady", "the CNI network component is not part of this build"
        )
    readiness: Readiness = network.readiness()
    return readiness


def _condition(kind: str, readiness: Readiness) -> api_pb2.RuntimeCondition:
    return api_pb2.RuntimeCondition(
        type=kind,
        status=readiness.ok,
        reason="" if readiness.ok else readiness.reason,
        message="" if readiness.ok else readiness.message,
    )
