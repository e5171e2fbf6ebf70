"""A tiny distribution-API server for the failures a real registry never produces.

docker-registry verifies what is pushed to it and always answers, so corrupt blobs, stalled
and truncated downloads and a Bearer token service are served by this aiohttp app instead. It
speaks just enough of the API for a pull: ``/v2/``, manifests by tag or digest, blobs, and
``/token``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from tests.fixtures.oci_builder import Image


@dataclass
class FakeRegistry:
    host: str = ""
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)  # served with one byte flipped
    stall: set[str] = field(default_factory=set)  # first bytes sent, then silence
    truncate: set[str] = field(default_factory=set)  # half sent, then the connection closed
    # With bearer_user set, every /v2/ call needs a token from /token for these credentials.
    bearer_user: tuple[str, str] | None = None
    # An OAuth2 refresh token that /token accepts by POST (CRI identity_token).
    refresh_token: str = ""
    scheme: str = "http"
    tokens: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)

    def add_image(self, repository: str, tag: str, image: Image) -> None:
        for blob in image.blobs():
            self.blobs[blob.digest] = blob.data
        entry = (image.manifest.media_type, image.manifest.data)
        self.manifests[(repository, tag)] = entry
        self.manifests[(repository, image.manifest_digest)] = entry

    def ref(self, repository: str, tag: str) -> str:
        return f"{self.host}/{repository}:{tag}"

    # -- handlers -------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        if self.bearer_user is None:
            return True
        header = request.headers.get("Authorization", "")
        return header.startswith("Bearer ") and header[7:] in self.tokens

    def _challenge(self, repository: str) -> web.Response:
        realm = f"{self.scheme}://{self.host}/token"
        header = f'Bearer realm="{realm}",service="fake",scope="repository:{repository}:pull"'
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
            headers={"WWW-Authenticate": header},
        )

    async def token(self, request: web.Request) -> web.Response:
        self.requests.append(f"TOKEN {request.query_string}")
        expected = self.bearer_user or ("", "")
        pair = f"{expected[0]}:{expected[1]}".encode()
        if request.headers.get("Authorization") != "Basic " + base64.b64encode(pair).decode():
            return web.Response(status=401)
        token = secrets.token_hex(8)
        self.tokens.add(token)
        return web.json_response({"token": token})

    async def token_by_refresh(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests.append(f"POST TOKEN {form.get('grant_type')} {form.get('scope')}")
        if not self.refresh_token or form.get("refresh_token") != self.refresh_token:
            return web.Response(status=401)
        token = secrets.token_hex(8)
        self.tokens.add(token)
        return web.json_response({"access_token": token})

    async def base(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._challenge("")
        return web.json_response({})

    async def manifest(self, request: web.Request) -> web.Response:
        repository, reference = request.match_info["repo"], request.match_info["ref"]
        self.requests.append(f"GET manifest {repository}:{reference}")
        if not self._authorized(request):
            return self._challenge(repository)
        found = self.manifests.get((repository, reference))
        if found is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        return web.Response(body=found[1], headers={"Content-Type": found[0]})

    async def blob(self, request: web.Request) -> web.StreamResponse:
        repository, digest = request.match_info["repo"], request.match_info["digest"]
        self.requests.append(f"GET blob {digest}")
        if not self._authorized(request):
            return self._challenge(repository)
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        if digest in self.stall:
            await response.write(data[:10])
            await asyncio.sleep(3600)
        if digest in self.truncate:
            await response.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(data)
        return response


@contextlib.asynccontextmanager
async def serve(tls: ssl.SSLContext | None = None) -> AsyncIterator[FakeRegistry]:
    fake = FakeRegistry(scheme="https" if tls else "http")
    app = web.Application()
    app.router.add_get("/v2/", fake.base)
    app.router.add_get("/token", fake.token)
    app.router.add_post("/token", fake.token_by_refresh)
    app.router.add_get(r"/v2/{repo:.+}/manifests/{ref}", fake.manifest)
    app.router.add_get(r"/v2/{repo:.+}/blobs/{digest}", fake.blob)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.host = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
async def fake_registry() -> AsyncIterator[FakeRegistry]:
    async with serve() as fake:
        yield fake


@dataclass(frozen=True)
class ThrowawayCA:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        return context


@pytest.fixture
def throwaway_ca(tmp_path: Path) -> ThrowawayCA:
    """A throwaway CA and a server certificate for IP 127.0.0.1, made with openssl(1)."""
    d = tmp_path / "pki"
    d.mkdir()
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=crivm test CA", "-keyout", "ca.key", "-out", "ca.crt"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", "server.key", "-out", "server.csr"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.crt"],
    ]
    for step in steps:
        subprocess.run(["openssl", *step], cwd=d, check=True, capture_output=True,  # noqa: S603, S607
                       timeout=60)
    return ThrowawayCA(d / "ca.crt", d / "server.crt", d / "server.key")
