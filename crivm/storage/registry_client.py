"""A client for one repository at one registry endpoint (Docker Registry HTTP API v2).

It fetches manifests and streams blobs (into a ``BlobWriter``, or to whoever iterates them),
answering ``401`` challenges with Bearer tokens (``WWW-Authenticate: Bearer realm=...``) or
Basic credentials. HTTP and network failures are translated into crivm errors here, once:
401/403 -> Unauthenticated, 404 -> NotFound, 5xx/429 and connection failures -> Unavailable,
each naming the registry.

TLS uses the system CAs plus ``<registry_certs_dir>/<host[:port]>/*.crt`` (and a client
certificate from ``*.cert`` + ``*.key``). Plain http is used only for registries that
registries.conf marks insecure, after https (unverified) fails, as containers/image does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from crivm.errors import NotFound, Unauthenticated, Unavailable
from crivm.storage.blobs import BlobWriter, DigestMismatch, sha256_digest
from crivm.storage.credentials import Challenge, Credentials, parse_challenge
from crivm.storage.manifest import ACCEPT, BadManifest
from crivm.storage.registries_conf import PullSource

log = logging.getLogger(__name__)

DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
_CHUNK = 1 << 16
# Manifests are small; a bigger one is a broken or hostile registry.
_MAX_MANIFEST_BYTES = 4 << 20
_NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class FetchedManifest:
    body: bytes
    media_type: str  # from Content-Type; the body's own mediaType is checked by the caller
    digest: str  # of the body, verified against the requested digest when there was one


def tls_context(host: str, certs_dir: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    directory = Path(certs_dir) / host if certs_dir else None
    if directory is not None and directory.is_dir():
        for ca in sorted(directory.glob("*.crt")):
            context.load_verify_locations(cafile=str(ca))
        for cert in sorted(directory.glob("*.cert")):
            key = cert.with_suffix(".key")
            if key.is_file():
                context.load_cert_chain(str(cert), str(key))
    return context


class RegistryClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        source: PullSource,
        credentials: Credentials,
        certs_dir: str,
        progress: Callable[[int], None],
    ) -> None:
        self._session = session
        self._source = source
        self._credentials = credentials
        self._progress = progress
        self.host = source.host
        self.repository = source.reference.path
        endpoint = DOCKER_HUB_ENDPOINT if self.host == "docker.io" else self.host
        self._endpoint = endpoint
        self._schemes = ["https", "http"] if source.insecure else ["https"]
        self._ssl: ssl.SSLContext | bool = (
            False if source.insecure else tls_context(self.host, certs_dir)
        )
        self._authorization: str | None = None
        if credentials.registry_token:
            self._authorization = f"Bearer {credentials.registry_token}"

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    async def get_manifest(self, reference: str) -> FetchedManifest:
        path = f"/v2/{self.repository}/manifests/{reference}"
        async with await self._request(path, {"Accept": ACCEPT}, f"{self.name}:{reference}") as r:
            body = await self._read_limited(r, _MAX_MANIFEST_BYTES, reference)
            content_type = r.headers.get("Content-Type", "")
        digest = sha256_digest(body)
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatch(
                f"manifest {self.name}@{reference} from {self.host} hashes to {digest}"
            )
        self._progress(len(body))
        return FetchedManifest(body, content_type, digest)

    async def blob_chunks(self, digest: str, expected_size: int,
                          progress: Callable[[int], None]) -> AsyncGenerator[bytes, None]:
        """Blob ``digest`` in the pieces the socket delivers; verifying it is the caller's job.
        Close it (``contextlib.aclosing``) to give the connection back early."""
        path = f"/v2/{self.repository}/blobs/{digest}"
        async with await self._request(path, {}, f"{self.name}@{digest}") as response:
            received = 0
            try:
                # iter_any: everything buffered at once, so one hop per socket read.
                async for chunk in response.content.iter_any():
                    received += len(chunk)
                    if received > expected_size >= 0:
                        raise DigestMismatch(
                            f"blob {digest} from {self.host} is larger than the "
                            f"{expected_size} bytes its descriptor says"
                        )
                    progress(len(chunk))
                    yield chunk
            except _NETWORK_ERRORS as exc:
                raise Unavailable(
                    f"registry {self.host}: download of {digest} broke off: {_describe(exc)}"
                ) from exc

    async def fetch_blob(self, digest: str, expected_size: int, writer: BlobWriter,
                         progress: Callable[[int], None]) -> None:
        """Stream blob ``digest`` into ``writer``; the caller commits (verifies) it."""
        async with contextlib.aclosing(self.blob_chunks(digest, expected_size, progress)) as chunks:
            async for chunk in chunks:
                writer.write(chunk)

    # -- HTTP with authentication ---------------------------------------------------------

    async def _request(
        self, path: str, headers: dict[str, str], what: str
    ) -> aiohttp.ClientResponse:
        """GET ``path``; on 401 authenticate once and retry. The caller closes the response."""
        response = await self._get(path, headers)
        if response.status == 401:
            challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            response.release()
            await self._authenticate(challenge)
            response = await self._get(path, headers)
            if response.status == 401:
                response.release()
                raise Unauthenticated(self._refused())
        if response.status == 200:
            return response
        try:
            await self._raise_for_status(response, what)
        finally:
            response.release()
        raise AssertionError("unreachable: _raise_for_status always raises")

    async def _get(self, path: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        if self._authorization:
            headers = {**headers, "Authorization": self._authorization}
        last_error: BaseException | None = None
        for scheme in list(self._schemes):
            url = f"{scheme}://{self._endpoint}{path}"
            try:
                return await self._session.get(
                    url, headers=headers, ssl=self._ssl if scheme == "https" else False
                )
            except _NETWORK_ERRORS as exc:
                last_error = exc
                if scheme == "https" and len(self._schemes) > 1:
                    log.debug("registry %s: https failed (%s), trying http", self.host, exc)
                    # This insecure registry speaks plain http; stop trying TLS first.
                    self._schemes = ["http"]
        assert last_error is not None
        raise Unavailable(
            f"registry {self.host} is unreachable: {_describe(last_error)}"
        ) from last_error

    async def _authenticate(self, challenge: Challenge | None) -> None:
        if challenge is None:
            raise Unauthenticated(
                f"registry {self.host} answered 401 without a WWW-Authenticate challenge"
            )
        creds = self._credentials
        if challenge.scheme == "basic":
            if not (creds.username or creds.password):
                raise Unauthenticated(
                    f"registry {self.host} requires authentication for {self.repository} "
                    "and no credentials were given"
                )
            self._authorization = _basic(creds)
        elif challenge.scheme == "bearer":
            self._authorization = "Bearer " + await self._fetch_token(challenge)
        else:
            raise Unauthenticated(
                f"registry {self.host} wants {challenge.scheme!r} authentication, "
                "which crivm does not speak"
            )

    async def _fetch_token(self, challenge: Challenge) -> str:
        realm = challenge.params.get("realm")
        if not realm:
            raise Unauthenticated(f"registry {self.host}: Bearer challenge without a realm")
        scope = challenge.params.get("scope") or f"repository:{self.repository}:pull"
        service = challenge.params.get("service", "")
        creds = self._credentials
        try:
            if creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "service": service, "scope": scope, "client_id": "crivm"}
                response = await self._session.post(realm, data=form, ssl=self._realm_ssl(realm))
            else:
                headers = {}
                if creds.username or creds.password:
                    headers["Authorization"] = _basic(creds)
                params = {"scope": scope, "service": service} if service else {"scope": scope}
                response = await self._session.get(
                    realm, params=params, headers=headers, ssl=self._realm_ssl(realm)
                )
            async with response:
                if response.status in (401, 403):
                    raise Unauthenticated(self._refused(token_server=realm))
                if response.status != 200:
                    raise Unavailable(
                        f"token server {realm} for registry {self.host} answered "
                        f"HTTP {response.status}"
                    )
                document: Any = await response.json(content_type=None)
        except _NETWORK_ERRORS as exc:
            raise Unavailable(
                f"token server {realm} for registry {self.host} is unreachable: {_describe(exc)}"
            ) from exc
        except ValueError as exc:
            raise Unavailable(f"token server {realm} sent a malformed answer: {exc}") from exc
        token = document.get("token") or document.get("access_token") if isinstance(
            document, dict) else None
        if not isinstance(token, str) or not token:
            raise Unavailable(f"token server {realm} for registry {self.host} sent no token")
        return token

    def _realm_ssl(self, realm: str) -> ssl.SSLContext | bool:
        return self._ssl if realm.startswith("https://") else False

    def _refused(self, token_server: str = "") -> str:
        where = f" (token server {token_server})" if token_server else ""
        if self._credentials:
            return (f"registry {self.host}{where} refused the given credentials for "
                    f"{self.repository}: authentication failed")
        return (f"registry {self.host}{where} requires authentication for {self.repository} "
                "and no credentials were given")

    async def _raise_for_status(self, response: aiohttp.ClientResponse, what: str) -> None:
        codes = await _error_codes(response)
        status = response.status
        if status == 403:
            raise Unauthenticated(f"registry {self.host} denied access to {what} (HTTP 403)")
        if status == 404:
            if "NAME_UNKNOWN" in codes:
                raise NotFound(f"repository {self.name} not found on registry {self.host}")
            raise NotFound(f"{what} not found on registry {self.host}")
        if status == 429 or status >= 500:
            raise Unavailable(f"registry {self.host} answered HTTP {status} for {what}")
        raise BadManifest(f"registry {self.host} answered HTTP {status} for {what} {codes}")

    async def _read_limited(
        self, response: aiohttp.ClientResponse, limit: int, what: str
    ) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in response.content.iter_chunked(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise BadManifest(f"manifest {what} from {self.host} exceeds {limit} bytes")
                chunks.append(chunk)
        except _NETWORK_ERRORS as exc:
            raise Unavailable(f"registry {self.host}: read of {what} broke off") from exc
        return b"".join(chunks)


async def _error_codes(response: aiohttp.ClientResponse) -> list[str]:
    """The ``errors[].code`` values of a distribution error body, if it has one."""
    try:
        document = json.loads(await response.content.read(64 * 1024))
    except (ValueError, *_NETWORK_ERRORS):
        return []
    errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(errors, list):
        return []
    return [str(e.get("code")) for e in errors if isinstance(e, dict)]


def _basic(creds: Credentials) -> str:
    pair = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientSSLError):
        return (f"TLS failed ({exc.os_error}); if it serves plain http, mark it insecure "
                "in registries.conf")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return str(exc) or type(exc).__name__
