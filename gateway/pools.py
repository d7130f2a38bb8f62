"""The vision and language servers behind the gateway: least-outstanding balancing, health checks
with ejection and re-admission, and DNS names that stand for several servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc

from contracts.grpc_secret import client_interceptors
from contracts.grpc_tls import TlsFiles, channel_credentials
from gateway import metrics
from gateway.errors import APIError
from proto import dvd_pb2, dvd_pb2_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 512 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    # A restarted server is found again within seconds, not after gRPC's default 2-minute backoff.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]
DNS_PREFIX = "dns:"
# A server that refuses a health check, or says it is not ready, is ejected at once; one that answers late is
# likely busy (a long prefill on a loaded host) and is ejected only after this many late answers in a row.
LATE_CHECKS_TO_EJECT = 3


@dataclass
class Backend:
    kind: str
    address: str
    stub: object
    channel: grpc.aio.Channel
    outstanding: int = 0
    up: bool = True  # optimistic until a health check or a failed call says otherwise
    weights: str = ""  # the fingerprint of the weights it serves, from its last health reply
    late_checks: int = 0  # health checks in a row that timed out
    description: dvd_pb2.ModelDescription | None = field(default=None)

    def mark_down(self, reason: str) -> None:
        if self.up:
            log.warning("%s server %s ejected: %s", self.kind, self.address, reason)
        self.up = False
        self.description = None  # a restarted language server may listen for features elsewhere
        metrics.BACKEND_UP.labels(self.kind, self.address).set(0)

    def mark_up(self) -> None:
        if not self.up:
            log.info("%s server %s re-admitted", self.kind, self.address)
        self.up = True
        metrics.BACKEND_UP.labels(self.kind, self.address).set(1)


def split_target(target: str) -> tuple[str, int]:
    """("name", port) of a "dns:NAME:PORT" entry."""
    host, sep, port = target[len(DNS_PREFIX):].lstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"server entry {target!r}: expected dns:NAME:PORT")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BackendPool:
    """One pool per server kind; `lease()` picks the least loaded healthy server and counts the request on it."""

    def __init__(self, kind: str, targets: list[str], stub_cls, secret: str | None = None,
                 tls: TlsFiles | None = None, server_name: str | None = None):
        self.kind = kind
        self._interceptors = client_interceptors(secret)
        self._tls = tls or TlsFiles()  # no CA: plaintext
        self._tls_stamp = self._tls.stamp()
        self._credentials = channel_credentials(self._tls)
        self._options = CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
        self.targets = list(targets)
        self._stub_cls = stub_cls
        self.backends: list[Backend] = []
        self._closing: set[asyncio.Task] = set()
        for target in self.targets:
            if target.startswith(DNS_PREFIX):
                split_target(target)  # fail at start on a malformed entry
            else:
                self._add(target)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(address, options=self._options, interceptors=self._interceptors)
        return grpc.aio.secure_channel(address, self._credentials, options=self._options,
                                       interceptors=self._interceptors)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.create_task(channel.close(grace=60))  # lets its calls finish
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _add(self, address: str) -> Backend:
        channel = self._channel(address)
        backend = Backend(self.kind, address, self._stub_cls(channel), channel)
        self.backends.append(backend)
        metrics.BACKEND_OUTSTANDING.labels(self.kind, address).set_function(lambda: backend.outstanding)
        metrics.BACKEND_UP.labels(self.kind, address).set(1)
        return backend

    def reload_tls(self) -> None:
        """New channels once the gateway's TLS files change (certificates rotated in place); calls under
        way finish on the old ones. Files that do not load leave the current channels in use."""
        stamp = self._tls.stamp()
        if stamp == self._tls_stamp:
            return
        self._tls_stamp = stamp
        try:
            credentials = channel_credentials(self._tls)
        except (OSError, ValueError) as exc:
            log.warning("TLS files changed but did not load, %s servers keep the previous ones: %s", self.kind, exc)
            return
        self._credentials = credentials
        for backend in self.backends:
            old = backend.channel
            backend.channel = self._channel(backend.address)
            backend.stub = self._stub_cls(backend.channel)
            self._close_later(old)
        log.info("TLS certificate reloaded: new channels to %d %s servers", len(self.backends), self.kind)

    async def resolve(self) -> None:
        """Re-resolve "dns:" entries: new addresses join the pool, vanished ones leave it."""
        wanted = {t for t in self.targets if not t.startswith(DNS_PREFIX)}
        loop = asyncio.get_running_loop()
        for target in self.targets:
            if not target.startswith(DNS_PREFIX):
                continue
            host, port = split_target(target)
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                log.warning("%s servers %s: cannot resolve: %s", self.kind, target, exc.strerror)
                wanted |= {b.address for b in self.backends}  # keep what we have until DNS answers again
                continue
            wanted |= {join_address(info[4][0], info[4][1]) for info in infos}
        known = {b.address for b in self.backends}
        for address in sorted(wanted - known):
            log.info("%s server %s added", self.kind, address)
            self._add(address)
        for backend in [b for b in self.backends if b.address not in wanted]:
            log.info("%s server %s removed (no longer in DNS)", self.kind, backend.address)
            self.backends.remove(backend)
            metrics.BACKEND_OUTSTANDING.remove(self.kind, backend.address)
            metrics.BACKEND_UP.remove(self.kind, backend.address)
            self._close_later(backend.channel)

    def candidates(self, exclude: set[str] = frozenset()) -> list[Backend]:
        """Servers passing health checks; when none does, all of them: a call fails fast if they are
        really down, and a server that came up since the last check serves at once."""
        remaining = [b for b in self.backends if b.address not in exclude]
        return [b for b in remaining if b.up] or remaining

    @contextlib.contextmanager
    def lease(self, candidates: list[Backend] | None = None, prefer: str | None = None, max_extra_load: int = 0):
        """The least loaded candidate, or `prefer` (an address) while it carries at most `max_extra_load`
        more requests than the least loaded."""
        candidates = self.candidates() if candidates is None else candidates
        if not candidates:
            raise APIError(503, f"no {self.kind} server is available ({len(self.backends)} known)")
        backend = min(candidates, key=lambda b: b.outstanding)
        preferred = next((b for b in candidates if b.address == prefer), None)
        if preferred is not None and preferred.outstanding <= backend.outstanding + max_extra_load:
            backend = preferred
        backend.outstanding += 1
        try:
            yield backend
        finally:
            backend.outstanding -= 1

    async def check(self, timeout_s: float) -> int:
        """Health-check every server, ejecting those that fail and re-admitting those that pass; how many are in."""
        self.reload_tls()
        await self.resolve()
        results = await asyncio.gather(*(self._check(b, timeout_s) for b in self.backends))
        return sum(results)

    async def check_ejected(self, timeout_s: float) -> None:
        """Health-check only the servers out of the pool, re-admitting those that pass."""
        await asyncio.gather(*(self._check(b, timeout_s) for b in self.backends if not b.up))

    async def _check(self, backend: Backend, timeout_s: float) -> bool:
        """Whether `backend` stays in the pool after one health check."""
        try:
            reply = await backend.stub.Health(dvd_pb2.HealthRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            late = exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            backend.late_checks = backend.late_checks + 1 if late else 0
            if not late or backend.late_checks >= LATE_CHECKS_TO_EJECT:
                backend.mark_down(f"health check failed ({backend.late_checks} late in a row)" if late else
                                  f"health check failed: {exc.code().name}")
            return backend.up
        backend.late_checks = 0
        backend.weights = reply.weights
        if reply.ready:
            backend.mark_up()
        else:
            backend.mark_down("the server reports it is not ready")
        return reply.ready

    async def close(self) -> None:
        for backend in self.backends:
            await backend.channel.close()


class FeatureHolders:
    """Which language server last took each image content key: a chat's later turns go where its images'
    features (and its prompt's KV blocks) already are. Bounded; the oldest keys are forgotten first."""

    def __init__(self, max_keys: int = 100_000):
        self._holder: OrderedDict[str, str] = OrderedDict()
        self._max_keys = max_keys

    def record(self, keys: list[str], address: str) -> None:
        for key in keys:
            self._holder[key] = address
            self._holder.move_to_end(key)
        while len(self._holder) > self._max_keys:
            self._holder.popitem(last=False)

    def holder(self, key: str) -> str | None:
        """The address that last took `key`, if any."""
        return self._holder.get(key)

    def best(self, keys: list[str]) -> str | None:
        """The address holding most of `keys`, if any holds one."""
        votes: dict[str, int] = {}
        for key in keys:
            if key in self._holder:
                votes[self._holder[key]] = votes.get(self._holder[key], 0) + 1
        return max(votes, key=votes.get) if votes else None


class LanguagePool(BackendPool):
    """Language servers also tell the gateway where their features go (`Describe`)."""

    def __init__(self, targets: list[str], secret: str | None = None, **tls):
        super().__init__("language", targets, dvd_pb2_grpc.LanguageServiceStub, secret, **tls)
        self.holders = FeatureHolders()

    async def describe(self, timeout_s: float = 2.0) -> list[Backend]:
        """Healthy servers with a known description, asking those not yet described."""
        for backend in self.candidates():
            if backend.description is None:
                await self._describe(backend, timeout_s)
        return [b for b in self.candidates() if b.description is not None]

    async def _describe(self, backend: Backend, timeout_s: float) -> None:
        try:
            backend.description = await backend.stub.Describe(dvd_pb2.DescribeRequest(), timeout=timeout_s)
            backend.mark_up()
        except grpc.aio.AioRpcError as exc:
            log.info("language server %s not ready: %s", backend.address, exc.code().name)

    async def _check(self, backend: Backend, timeout_s: float) -> bool:
        # Only this server: asking the others here would ask one whose own check is under way, and its answer
        # could re-admit it just after it said it is not ready.
        ok = await super()._check(backend, timeout_s)
        if ok and backend.description is None:
            await self._describe(backend, timeout_s)
        return ok


class VisionPool(BackendPool):
    def __init__(self, targets: list[str], secret: str | None = None, **tls):
        super().__init__("vision", targets, dvd_pb2_grpc.VisionServiceStub, secret, **tls)

    @property
    def weights(self) -> str:
        """The weights the healthy servers encode with: part of every content key, so features cached
        before the vision weights changed are not found after (while a rollout mixes two, both count).
        A server not yet health-checked does not count until it has told."""
        return "+".join(sorted({b.weights for b in self.candidates() if b.weights}))


async def check_forever(pools: list[BackendPool], interval_s: float, timeout_s: float,
                        ejected_interval_s: float | None = None) -> None:
    """Every server each `interval_s`; in between, the servers out of the pool each `ejected_interval_s` (when
    shorter), so that one coming up (a restart, a slow engine start) is admitted within that, not a round later."""
    loop = asyncio.get_running_loop()
    pause_s = min(interval_s, ejected_interval_s or interval_s)
    while True:
        await _check_each(pools, timeout_s, BackendPool.check)
        round_end = loop.time() + interval_s
        while (left := round_end - loop.time()) > 0:
            await asyncio.sleep(min(left, pause_s))
            if loop.time() < round_end:
                await _check_each(pools, timeout_s, BackendPool.check_ejected)


async def _check_each(pools: list[BackendPool], timeout_s: float, check) -> None:
    for pool in pools:
        try:
            await check(pool, timeout_s)
        except Exception:  # a health round must never end the loop
            log.exception("health check of %s servers failed", pool.kind)
