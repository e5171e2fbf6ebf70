"""Pulling an image: sources from registries.conf, manifest, config, layers, record.

Each source (mirrors in order, then the primary location) is tried in turn until one yields
the whole image; blobs fetched from an earlier source are kept. Layers download and unpack
concurrently. Two pulls of the same reference share one pull, and two pulls sharing a layer
share its download. A watchdog fails a pull that makes no progress (no bytes received or
unpacked) for ``progress_timeout`` seconds with DeadlineExceeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from crivm.errors import CrivmError, DeadlineExceeded
from crivm.runtime.store import now_ns
from crivm.storage import registries_conf
from crivm.storage.blobs import BlobStore
from crivm.storage.catalog import Catalog, ImageRecord, LayerRecord
from crivm.storage.credentials import AuthFile, Credentials
from crivm.storage.layer_store import LayerStore, chain_ids
from crivm.storage.manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    BadManifest,
    Descriptor,
    check_supported,
    media_type_of,
    parse_config,
    parse_manifest,
    select_platform,
)
from crivm.storage.reference import ImageReference
from crivm.storage.registries_conf import PullSource
from crivm.storage.registry_client import RegistryClient

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# Layers of one pull fetched at once: enough to fill a link, few enough not to thrash a disk.
LAYER_CONCURRENCY = 3


@dataclass(frozen=True)
class PullSettings:
    registries_conf: str
    auth_file: str
    certs_dir: str
    progress_timeout: float


@dataclass
class _Progress:
    what: str
    last: float = field(default_factory=time.monotonic)
    received: int = 0
    stage: str = "starting"
    # Chains this pull holds against garbage collection until its image is recorded.
    chains: list[str] = field(default_factory=list)

    def touch(self, count: int = 0) -> None:
        # Called from unpack threads too: two plain assignments, no shared structure.
        self.last = time.monotonic()
        self.received += count


class _LayerJob:
    """One layer's download + unpack, shared by every pull that needs it at the same time."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[int], None]] = []
        self.waiters = 0
        self.task: asyncio.Task[LayerRecord] | None = None

    def progress(self, count: int) -> None:
        for listener in tuple(self.listeners):
            listener(count)


class Puller:
    def __init__(self, settings: PullSettings, blobs: BlobStore, layers: LayerStore,
                 catalog: Catalog) -> None:
        self._settings = settings
        self._blobs = blobs
        self._layers = layers
        self._catalog = catalog
        self._session: aiohttp.ClientSession | None = None
        self._pulls: dict[tuple[str, Credentials], asyncio.Task[ImageRecord]] = {}
        self._layer_jobs: dict[str, _LayerJob] = {}
        # Chain ids a pull in progress has unpacked but not yet recorded under an image;
        # garbage collection must not take them.
        self.chains_in_use: dict[str, int] = {}
        # Told (seconds, succeeded) after every pull; the metrics hook in. Blob bytes
        # fetched from registries, all pulls together (``received`` counts unpacking too).
        self.observers: list[Callable[[float, bool], None]] = []
        self.bytes_downloaded = 0

    async def close(self) -> None:
        tasks = list(self._pulls.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def pull(self, ref: ImageReference, credentials: Credentials,
                   on_done: Callable[[ImageRecord], Awaitable[None]]) -> ImageRecord:
        """Pull ``ref``, or join the pull of it already running. ``on_done`` records it."""
        key = (str(ref), credentials)
        task = self._pulls.get(key)
        if task is None:
            task = asyncio.create_task(self._watched(ref, credentials, on_done))
            self._pulls[key] = task
            task.add_done_callback(lambda _: self._pulls.pop(key, None))
        else:
            log.info("joining the pull of %s already in progress", ref)
        return await asyncio.shield(task)

    async def _watched(self, ref: ImageReference, credentials: Credentials,
                       on_done: Callable[[ImageRecord], Awaitable[None]]) -> ImageRecord:
        progress = _Progress(str(ref))
        timeout = self._settings.progress_timeout
        started = time.monotonic()
        work = asyncio.create_task(self._from_sources(ref, credentials, progress))
        succeeded = False
        try:
            while True:
                remaining = progress.last + timeout - time.monotonic()
                done, _ = await asyncio.wait({work}, timeout=max(remaining, 0.05))
                if work in done:
                    break
                if time.monotonic() - progress.last >= timeout:
                    raise DeadlineExceeded(
                        f"pull of {ref} made no progress for {timeout:g}s while "
                        f"{progress.stage} ({progress.received} bytes received); gave up"
                    )
            image = work.result()
            await on_done(image)
            succeeded = True
        finally:
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            self._release(progress.chains)
            for observer in self.observers:
                observer(time.monotonic() - started, succeeded)
        log.info("pulled %s as %s: %d bytes in %.2fs", ref, image.id, progress.received,
                 time.monotonic() - started)
        return image

    async def _from_sources(self, ref: ImageReference, credentials: Credentials,
                            progress: _Progress) -> ImageRecord:
        conf = registries_conf.load(self._settings.registries_conf)
        sources = conf.sources(ref)
        auth_file = AuthFile.load(self._settings.auth_file)
        failures: list[str] = []
        for index, source in enumerate(sources):
            creds = credentials or auth_file.lookup(source.host, source.reference.path)
            client = RegistryClient(self._http(), source, creds, self._settings.certs_dir,
                                    progress.touch)
            try:
                return await self._from_source(ref, source, client, progress)
            except CrivmError as exc:
                if index == len(sources) - 1:
                    replacement = _with_earlier_failures(exc, failures)
                    if replacement is exc:
                        raise
                    raise replacement from exc
                log.warning("pull of %s from %s failed (%s); trying %s", ref, source.host, exc,
                            sources[index + 1].host)
                failures.append(f"{source.host}: {exc}")
        raise AssertionError("unreachable: sources() always yields the primary location")

    async def _from_source(self, ref: ImageReference, source: PullSource,
                           client: RegistryClient, progress: _Progress) -> ImageRecord:
        progress.stage = f"fetching the manifest from {source.host}"
        what = f"{source.reference.name}:{source.reference.manifest_ref}"
        fetched = await client.get_manifest(source.reference.manifest_ref)
        media_type = media_type_of(fetched.body, fetched.media_type)
        check_supported(media_type, what)
        index_digest = ""
        if media_type in INDEX_TYPES:
            index_digest = fetched.digest
            self._blobs.put(fetched.digest, fetched.body, source.host)
            chosen = select_platform(fetched.body, what)
            fetched = await client.get_manifest(chosen.digest)
            media_type = media_type_of(fetched.body, fetched.media_type)
            if media_type not in MANIFEST_TYPES:
                raise BadManifest(f"{what}: linux/amd64 entry is {media_type!r}, not a manifest")
        manifest = parse_manifest(fetched.body, what)
        self._blobs.put(fetched.digest, fetched.body, source.host)

        progress.stage = f"fetching config {manifest.config.digest} from {source.host}"
        await self._ensure_blob(client, manifest.config, progress.touch)
        config = parse_config(self._blobs.read(manifest.config.digest), what)
        if len(config.diff_ids) != len(manifest.layers):
            raise BadManifest(f"{what}: {len(manifest.layers)} layers but "
                              f"{len(config.diff_ids)} diff_ids in the config")

        progress.stage = f"fetching {len(manifest.layers)} layers from {source.host}"
        chains = chain_ids(config.diff_ids)
        for chain in chains:
            self.chains_in_use[chain] = self.chains_in_use.get(chain, 0) + 1
            progress.chains.append(chain)
        limit = asyncio.Semaphore(LAYER_CONCURRENCY)
        layers = await _all_or_nothing([
            self._layer(client, limit, descriptor, diff_id, chain,
                        chains[i - 1] if i else "", progress)
            for i, (descriptor, diff_id, chain)
            in enumerate(zip(manifest.layers, config.diff_ids, chains, strict=True))
        ])
        tagged = ref.tagged()
        return ImageRecord(
            id=manifest.config.digest,
            manifest_digest=fetched.digest,
            index_digest=index_digest,
            size=sum(layer.size for layer in layers) + manifest.config.size,
            pinned=False,
            created_at=now_ns(),
            config=config.raw,
            layers=tuple(chains),
            repo_tags=(tagged,) if tagged and not ref.digest else (),
            repo_digests=(ref.with_digest(index_digest or fetched.digest),),
        )

    def _release(self, chains: list[str]) -> None:
        for chain in chains:
            count = self.chains_in_use.get(chain, 0) - 1
            if count > 0:
                self.chains_in_use[chain] = count
            else:
                self.chains_in_use.pop(chain, None)

    async def _ensure_blob(self, client: RegistryClient, descriptor: Descriptor,
                           progress: Callable[[int], None]) -> Path:
        if self._blobs.has(descriptor.digest):
            return self._blobs.path(descriptor.digest)
        writer = self._blobs.writer(descriptor.digest)
        try:
            await client.fetch_blob(descriptor.digest, descriptor.size, writer,
                                    self._counted(progress))
            return writer.commit(client.host)
        except BaseException:
            writer.discard()
            raise

    def _counted(self, progress: Callable[[int], None]) -> Callable[[int], None]:
        def fetched(count: int) -> None:
            self.bytes_downloaded += count
            progress(count)
        return fetched

    async def _layer(self, client: RegistryClient, limit: asyncio.Semaphore,
                     descriptor: Descriptor, diff_id: str, chain: str, parent: str,
                     progress: _Progress) -> LayerRecord:
        existing = self._catalog.get_layer(chain)
        if existing is not None:
            return existing
        job = self._layer_jobs.get(chain)
        if job is None or job.task is None or _failed(job.task):
            job = _LayerJob()
            self._layer_jobs[chain] = job
            job.task = asyncio.create_task(
                self._fetch_layer(client, limit, descriptor, diff_id, chain, parent, job))
            job.task.add_done_callback(lambda _: self._layer_jobs.pop(chain, None))
        assert job.task is not None
        job.listeners.append(progress.touch)
        job.waiters += 1
        try:
            return await asyncio.shield(job.task)
        finally:
            job.waiters -= 1
            job.listeners.remove(progress.touch)
            if job.waiters == 0 and not job.task.done():
                # Every pull that wanted it has gone; wait for its cleanup before leaving.
                job.task.cancel()
                await asyncio.gather(job.task, return_exceptions=True)

    async def _fetch_layer(self, client: RegistryClient, limit: asyncio.Semaphore,
                           descriptor: Descriptor, diff_id: str, chain: str, parent: str,
                           job: _LayerJob) -> LayerRecord:
        # Unpacked as it downloads: the layer is the content from then on, the blob is not kept.
        async with limit, contextlib.aclosing(client.blob_chunks(
                descriptor.digest, descriptor.size, self._counted(job.progress))) as download:
            return await self._layers.unpack(chain, parent, diff_id, descriptor.digest,
                                             client.host, download, job.progress)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=self._settings.progress_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session


async def _all_or_nothing(coroutines: list[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Run concurrently; on the first failure cancel the rest and raise that failure."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                raise error
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _failed(task: asyncio.Task[Any]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _with_earlier_failures(exc: CrivmError, failures: list[str]) -> CrivmError:
    if not failures:
        return exc
    message = f"{exc} (after mirrors failed: {'; '.join(failures)})"
    try:
        return type(exc)(message)
    except TypeError:
        return exc
