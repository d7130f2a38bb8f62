"""The gateway's server pools (gateway/pools.py): least-outstanding leases with an affinity that gives way under
load, the candidates when health checks disagree, `dns:` entries, and where images' features were last taken; then
with real in-process gRPC servers: health checks that eject and re-admit, `dns:` names whose answers change (the
resolver faked at the event loop, DNS being an outside system), TLS with real certificates rotated in place, the
internal secret, and the health loop."""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY

from contracts.grpc_secret import server_interceptors
from contracts.grpc_tls import TlsFiles
from gateway.errors import APIError
from gateway.pools import FeatureHolders, LanguagePool, VisionPool, check_forever, join_address, split_target
from launcher import wait_until_async
from proto import dvd_pb2, dvd_pb2_grpc


def pool_of(count: int) -> VisionPool:
    return VisionPool([f"127.0.0.2:{51000 + i}" for i in range(count)])


def in_a_loop(body):
    """Run `body(pool)` on a 3-server pool inside an event loop (gRPC's aio channels want one)."""
    async def run():
        pool = pool_of(3)
        try:
            return body(pool)
        finally:
            await pool.close()

    return asyncio.run(run())


def test_a_lease_takes_the_least_loaded_server_first_in_order_on_a_tie_and_counts_itself_while_held():
    def body(pool):
        a, b, c = pool.backends
        taken = []
        with pool.lease() as first:
            taken.append(first.address)
            with pool.lease() as second:
                taken.append(second.address)
                a.outstanding += 5
                with pool.lease() as third:
                    taken.append(third.address)
                    loads = [x.outstanding for x in (a, b, c)]
        return taken, loads, [x.outstanding for x in (a, b, c)]

    taken, loads, after = in_a_loop(body)
    assert taken == ["127.0.0.2:51000", "127.0.0.2:51001", "127.0.0.2:51002"]
    assert loads == [6, 1, 1] and after == [5, 0, 0]


def test_a_lease_is_returned_when_the_call_fails():
    def body(pool):
        with pytest.raises(RuntimeError, match="^the call failed$"), pool.lease():
            raise RuntimeError("the call failed")
        return [b.outstanding for b in pool.backends]

    assert in_a_loop(body) == [0, 0, 0]


def test_the_preferred_server_is_taken_while_it_carries_at_most_the_extra_load_allowed():
    def body(pool):
        a, b, c = pool.backends
        b.outstanding, c.outstanding = 2, 3
        chosen = []
        for extra in (0, 1, 2, 3):
            with pool.lease(prefer=c.address, max_extra_load=extra) as backend:
                chosen.append(backend.address[-1])
        with pool.lease(prefer="127.0.0.9:1", max_extra_load=10) as backend:  # not a candidate
            chosen.append(backend.address[-1])
        return chosen

    assert in_a_loop(body) == ["0", "0", "0", "2", "0"]


def test_candidates_are_the_healthy_servers_or_else_all_of_them():
    def body(pool):
        a, b, c = pool.backends
        b.mark_down("test")
        healthy = [x.address for x in pool.candidates()]
        others = [x.address for x in pool.candidates(exclude={a.address})]
        a.mark_down("test")
        c.mark_down("test")
        everyone = [x.address for x in pool.candidates()]
        return healthy, others, everyone

    healthy, others, everyone = in_a_loop(body)
    assert healthy == ["127.0.0.2:51000", "127.0.0.2:51002"] and others == ["127.0.0.2:51002"]
    assert everyone == ["127.0.0.2:51000", "127.0.0.2:51001", "127.0.0.2:51002"]  # a call then fails fast


def test_without_candidates_a_lease_is_a_503_naming_the_kind():
    def body(pool):
        with pytest.raises(APIError, match=r"^no vision server is available \(3 known\)$") as caught, \
                pool.lease(candidates=[]):
            pass
        return caught.value.status

    assert in_a_loop(body) == 503


def test_ejection_and_readmission_show_on_the_metrics_and_forget_the_description(caplog):
    def body(pool):
        backend = pool.backends[0]
        backend.description = object()
        with caplog.at_level("INFO", logger="gateway.pools"):
            backend.mark_down("gone")
            backend.mark_down("still gone")  # logged once
            down = (backend.up, backend.description, gauge(backend.address))
            backend.mark_up()
            backend.mark_up()
        return down, (backend.up, gauge(backend.address))

    def gauge(address: str) -> float:
        return REGISTRY.get_sample_value("dvd_gateway_backend_up", {"kind": "vision", "address": address})

    down, up = in_a_loop(body)
    assert down == (False, None, 0) and up == (True, 1)
    assert caplog.messages == ["vision server 127.0.0.2:51000 ejected: gone",
                               "vision server 127.0.0.2:51000 re-admitted"]


@pytest.mark.parametrize(("target", "split"), [
    ("dns:vision:50051", ("vision", 50051)), ("dns://vision.svc:1", ("vision.svc", 1)), ("dns:[::1]:7", ("::1", 7)),
    ("dns://XR.svc:9", ("XR.svc", 9))])
def test_a_dns_entry_names_a_host_and_a_port(target, split):
    assert split_target(target) == split


@pytest.mark.parametrize("target", ["dns:vision", "dns::50051", "dns:vision:port", "dns:"])
def test_a_malformed_dns_entry_is_refused_naming_it(target):
    with pytest.raises(ValueError, match=f"^server entry '{target}': expected dns:NAME:PORT$"):
        split_target(target)


def test_addresses_bracket_ipv6_hosts():
    assert join_address("10.0.0.1", 5) == "10.0.0.1:5" and join_address("::1", 5) == "[::1]:5"


def test_the_holder_of_an_image_is_the_server_that_took_it_last():
    holders = FeatureHolders()
    holders.record(["k1", "k2"], "a")
    holders.record(["k2", "k3"], "b")
    assert (holders.holder("k1"), holders.holder("k2"), holders.holder("k9")) == ("a", "b", None)
    assert holders.best(["k1", "k2", "k3"]) == "b" and holders.best(["k1"]) == "a" and holders.best(["k9"]) is None


def test_the_holders_forget_the_least_recently_recorded_keys_first():
    holders = FeatureHolders(max_keys=2)
    holders.record(["k1", "k2"], "a")
    holders.record(["k1"], "a")  # k1 again: now k2 is the oldest
    holders.record(["k3"], "b")
    assert [holders.holder(k) for k in ("k1", "k2", "k3")] == ["a", None, "b"]


def test_the_outstanding_calls_show_on_the_metrics_page():
    async def run():
        pool = pool_of(1)
        try:
            with pool.lease():
                return REGISTRY.get_sample_value("dvd_gateway_backend_outstanding",
                                                 {"kind": "vision", "address": "127.0.0.2:51000"})
        finally:
            await pool.close()

    assert asyncio.run(run()) == 1


def test_the_holders_keep_a_hundred_thousand_keys_by_default():
    holders = FeatureHolders()
    holders.record([f"k{i}" for i in range(100_001)], "a")
    assert (holders.holder("k0"), holders.holder("k1"), holders.holder("k100000")) == (None, "a", "a")


def test_the_best_holder_is_the_one_holding_most_of_the_keys():
    holders = FeatureHolders()
    holders.record(["k1", "k2"], "a")
    holders.record(["k3"], "b")
    assert holders.best(["k3", "k1", "k2"]) == "a" and holders.best(["k3", "k1"]) == "b"  # a tie: the first seen


# With servers: real gRPC servers in this process.

def sample(name: str, kind: str, address: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"kind": kind, "address": address})


class Vision(dvd_pb2_grpc.VisionServiceServicer):
    """A vision server whose health answer the test sets; while `hold` is set, answers wait until it is released."""

    def __init__(self, ready: bool = True, weights: str = "w1"):
        self.ready, self.weights = ready, weights
        self.hold: asyncio.Event | None = None
        self.checks = 0
        self.encoded: list[str] = []  # the request ids of the Encode calls it took

    async def Encode(self, request, context):  # noqa: N802
        self.encoded.append(request.request_id)
        return dvd_pb2.EncodeResponse()

    async def Health(self, request, context):  # noqa: N802
        self.checks += 1
        if self.hold is not None:
            await self.hold.wait()
        return dvd_pb2.HealthResponse(ready=self.ready, weights=self.weights)


class Language(dvd_pb2_grpc.LanguageServiceServicer):
    """A language server whose `Describe` answers, fails with `refuse`, or waits while `hold` is set."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:9", ready: bool = True, model: str = "tiny"):
        self.endpoint, self.ready, self.model = endpoint, ready, model
        self.refuse: grpc.StatusCode | None = None
        self.hold: asyncio.Event | None = None
        self.refuse_health: grpc.StatusCode | None = None
        self.hold_health: asyncio.Event | None = None
        self.described = 0

    async def Health(self, request, context):  # noqa: N802
        if self.hold_health is not None:
            await self.hold_health.wait()
        if self.refuse_health is not None:
            await context.abort(self.refuse_health, "restarting")
        return dvd_pb2.HealthResponse(ready=self.ready)

    async def Describe(self, request, context):  # noqa: N802
        self.described += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.refuse is not None:
            await context.abort(self.refuse, "starting")
        return dvd_pb2.ModelDescription(model=self.model, feature_endpoint=self.endpoint, max_images_per_request=2)


class Servers:
    """The servers a test starts, all stopped at its end."""

    def __init__(self):
        self.started: list[grpc.aio.Server] = []

    async def start(self, servicer, address: str = "127.0.0.1:0", credentials: grpc.ServerCredentials | None = None,
                    secret: str | None = None) -> str:
        server = grpc.aio.server(interceptors=server_interceptors(secret))
        if isinstance(servicer, dvd_pb2_grpc.LanguageServiceServicer):
            dvd_pb2_grpc.add_LanguageServiceServicer_to_server(servicer, server)
        else:
            dvd_pb2_grpc.add_VisionServiceServicer_to_server(servicer, server)
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
        await server.start()
        self.started.append(server)
        return f"{address.rpartition(':')[0]}:{port}"

    async def stop(self) -> None:
        for server in self.started:
            await server.stop(None)


def with_servers(scenario):
    """Run `scenario(servers)` in an event loop and stop the servers it started (it closes its own pools)."""
    async def run():
        servers = Servers()
        try:
            return await scenario(servers)
        finally:
            await servers.stop()

    return asyncio.run(run())


def fake_dns(monkeypatch, answers: dict[str, list[str] | Exception]) -> list[tuple]:
    """Answer the running loop's name lookups from `answers` (a name's addresses, or the error its lookup
    raises), as getaddrinfo answers: one entry per address, IPv6 ones with a 4-part socket address."""
    asked = []

    async def getaddrinfo(host, port, *, family=0, type=0, proto=0, flags=0):  # noqa: A002
        asked.append((host, port, type))
        answer = answers[host]
        if isinstance(answer, Exception):
            raise answer
        return [(socket.AF_INET6, type, 6, "", (ip, port, 0, 0)) if ":" in ip else
                (socket.AF_INET, type, 6, "", (ip, port)) for ip in answer]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    return asked


async def closed(stub) -> str:
    """How a new health check on `stub` ends: "refused: Channel is closed." once its channel is closed."""
    try:
        await stub.Health(dvd_pb2.HealthRequest(), timeout=5)
        return "answered"
    except grpc.aio.UsageError as exc:
        return f"refused: {exc}"


def test_dns_answers_that_change_move_servers_into_and_out_of_the_pool_and_static_entries_stay(monkeypatch, caplog):
    """A name answering [A, B] then [B, C]: C joins, A leaves (its series gone from the metrics page, its channel
    closed once the call it was serving finished); the static entry D stays throughout."""
    a, b, c, d = (Vision(weights=w) for w in ("wa", "wb", "wc", "wd"))

    async def scenario(servers):
        first = await servers.start(a, "127.0.0.1:0")
        port = first.rpartition(":")[2]
        addresses = [first] + [await servers.start(s, f"127.0.0.{i}:{port}") for i, s in ((2, b), (3, c), (4, d))]
        answers = {"servers.test": ["127.0.0.2", "127.0.0.1"]}
        asked = fake_dns(monkeypatch, answers)
        pool = VisionPool([f"dns:servers.test:{port}", addresses[3]])
        try:
            at_start = [x.address for x in pool.backends]
            with caplog.at_level("INFO", logger="gateway.pools"):
                healthy = [await pool.check(5)]
                first_round = [x.address for x in pool.backends]
                leaving = pool.backends[1]
                a.hold = asyncio.Event()
                serving = asyncio.ensure_future(leaving.stub.Health(dvd_pb2.HealthRequest(), timeout=10))
                await wait_until_async(lambda: a.checks == 2, 10, "the call to A reaching A")
                answers["servers.test"] = ["127.0.0.3", "127.0.0.2"]
                healthy.append(await pool.check(5))
                series = [(sample("dvd_gateway_backend_up", "vision", x), sample(
                    "dvd_gateway_backend_outstanding", "vision", x)) for x in addresses]
                a.hold.set()
                served = (await serving).weights
                after = await closed(leaving.stub)
                await wait_until_async(lambda: leaving.channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN, 10,
                                       "A's channel closed")
                await asyncio.sleep(0)  # what runs once the closing is done
            return (at_start, first_round, [x.address for x in pool.backends], healthy, series, served, after,
                    [x.checks for x in (a, b, c, d)], asked, pool.weights)
        finally:
            await pool.close()

    at_start, first_round, second_round, healthy, series, served, after, checks, asked, weights = \
        with_servers(scenario)
    port = first_round[0].rpartition(":")[2]
    a_, b_, c_, d_ = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"
    assert at_start == [f"{d_}:{port}"]
    assert first_round == [f"{d_}:{port}", f"{a_}:{port}", f"{b_}:{port}"]  # new addresses join in order
    assert second_round == [f"{d_}:{port}", f"{b_}:{port}", f"{c_}:{port}"]
    assert healthy == [3, 3] and checks == [2, 2, 1, 2] and weights == "wb+wc+wd"
    assert series == [(None, None), (1, 0), (1, 0), (1, 0)]  # A's series are gone
    assert served == "wa" and after == "refused: Channel is closed."  # A's call finished; then its channel closed
    assert asked == [("servers.test", int(port), socket.SOCK_STREAM)] * 2
    assert caplog.messages == [f"vision server {a_}:{port} added", f"vision server {b_}:{port} added",
                               f"vision server {c_}:{port} added",
                               f"vision server {a_}:{port} removed (no longer in DNS)"]


def test_a_name_that_does_not_resolve_keeps_the_servers_the_pool_has_and_warns(monkeypatch, caplog):
    """One of two names failing: the other's answers still join, and what the pool had stays; in either order."""
    failure = socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def scenario(servers):
        answers = {"one.test": ["10.9.1.1"], "two.test": ["10.9.2.1"]}
        fake_dns(monkeypatch, answers)
        pool = VisionPool(["10.9.0.1:80", "dns:one.test:80", "dns:two.test:80"])
        try:
            seen = []
            await pool.resolve()
            seen.append([x.address for x in pool.backends])
            answers.update({"one.test": ["10.9.1.2"], "two.test": failure})
            with caplog.at_level("WARNING", logger="gateway.pools"):
                await pool.resolve()
            seen.append([x.address for x in pool.backends])
            answers.update({"one.test": failure, "two.test": ["10.9.2.1", "10.9.2.2"]})
            await pool.resolve()
            seen.append([x.address for x in pool.backends])
            answers.update({"one.test": ["10.9.1.2"], "two.test": ["10.9.2.2"]})
            await pool.resolve()
            seen.append([x.address for x in pool.backends])
            return seen
        finally:
            await pool.close()

    seen = with_servers(scenario)
    assert seen == [["10.9.0.1:80", "10.9.1.1:80", "10.9.2.1:80"],
                    ["10.9.0.1:80", "10.9.1.1:80", "10.9.2.1:80", "10.9.1.2:80"],
                    ["10.9.0.1:80", "10.9.1.1:80", "10.9.2.1:80", "10.9.1.2:80", "10.9.2.2:80"],
                    ["10.9.0.1:80", "10.9.1.2:80", "10.9.2.2:80"]]
    assert caplog.messages == ["vision servers dns:two.test:80: cannot resolve: Name or service not known",
                               "vision servers dns:one.test:80: cannot resolve: Name or service not known"]


def test_ipv6_answers_join_with_bracketed_addresses(monkeypatch):
    async def scenario(servers):
        fake_dns(monkeypatch, {"v6.test": ["fd00::7", "10.9.3.1"]})
        pool = LanguagePool(["dns:v6.test:5005"])
        try:
            await pool.resolve()
            return [x.address for x in pool.backends], sample("dvd_gateway_backend_up", "language", "[fd00::7]:5005")
        finally:
            await pool.close()

    assert with_servers(scenario) == (["10.9.3.1:5005", "[fd00::7]:5005"], 1)


def test_a_malformed_dns_entry_is_refused_when_the_pool_is_made():
    async def make():
        VisionPool(["10.9.4.1:1", "dns:vision"])

    with pytest.raises(ValueError, match="^server entry 'dns:vision': expected dns:NAME:PORT$"):
        asyncio.run(make())


def test_health_checks_eject_refusing_and_unready_servers_at_once_naming_why(caplog):
    ready, unready = Vision(weights="w1"), Vision(ready=False, weights="w2")

    async def scenario(servers):
        addresses = [await servers.start(ready), await servers.start(unready)]
        stopped = Servers()
        addresses.append(await stopped.start(Vision()))
        await stopped.stop()  # nothing listens there now
        pool = VisionPool(addresses)
        try:
            with caplog.at_level("WARNING", logger="gateway.pools"):
                healthy = await pool.check(5)
            return (addresses, healthy, [x.up for x in pool.backends], [x.weights for x in pool.backends],
                    [sample("dvd_gateway_backend_up", "vision", x) for x in addresses], pool.weights)
        finally:
            await pool.close()

    addresses, healthy, up, weights, series, pool_weights = with_servers(scenario)
    assert healthy == 1 and up == [True, False, False] and series == [1, 0, 0]
    assert weights == ["w1", "w2", ""] and pool_weights == "w1"
    assert sorted(caplog.messages) == sorted([
        f"vision server {addresses[1]} ejected: the server reports it is not ready",
        f"vision server {addresses[2]} ejected: health check failed: UNAVAILABLE"])


def test_a_late_server_is_ejected_at_the_third_late_answer_in_a_row_counted_anew_after_one_in_time(caplog):
    late = Vision()

    async def scenario(servers):
        pool = VisionPool([await servers.start(late)])
        backend = pool.backends[0]
        try:
            seen = [(await pool.check(5), backend.up)]
            late.hold = asyncio.Event()
            with caplog.at_level("INFO", logger="gateway.pools"):
                for _ in range(2):
                    seen.append((await asyncio.wait_for(pool.check(0.05), 10), backend.up))
                late.hold.set()
                seen.append((await pool.check(5), backend.up))  # in time: the count starts anew
                late.hold = asyncio.Event()
                for _ in range(3):
                    seen.append((await asyncio.wait_for(pool.check(0.05), 10), backend.up))
                late.hold.set()
                seen.append((await pool.check(5), backend.up))
            return backend.address, seen
        finally:
            await pool.close()

    address, seen = with_servers(scenario)
    assert seen == [(1, True), (1, True), (1, True), (1, True), (1, True), (1, True), (0, False), (1, True)]
    assert caplog.messages == [f"vision server {address} ejected: health check failed (3 late in a row)",
                               f"vision server {address} re-admitted"]


def test_a_language_server_is_described_at_its_first_good_health_check_and_only_then():
    described, unready = Language(endpoint="tcp://10.0.0.1:7"), Language(ready=False)

    async def scenario(servers):
        pool = LanguagePool([await servers.start(described), await servers.start(unready)])
        try:
            healthy = [await pool.check(5), await pool.check(5)]
            listed = [x.description.feature_endpoint for x in await pool.describe()]
            return healthy, listed, described.described, unready.described, pool.backends[1].description
        finally:
            await pool.close()

    assert with_servers(scenario) == ([1, 1], ["tcp://10.0.0.1:7"], 1, 0, None)


def test_a_server_saying_it_is_not_ready_is_not_re_admitted_by_the_description_of_another(caplog):
    """Two language servers checked in one round: the first passes and is described while the second's check is
    still under way; the second then says it is not ready, and stays out (it is not asked to describe itself)."""
    fine, errored = Language(endpoint="tcp://10.0.0.7:7"), Language(ready=False)

    async def scenario(servers):
        errored.hold_health, errored.hold = asyncio.Event(), asyncio.Event()
        pool = LanguagePool([await servers.start(fine), await servers.start(errored)])
        first, second = pool.backends
        try:
            with caplog.at_level("INFO", logger="gateway.pools"):
                round_ = asyncio.ensure_future(pool.check(5))
                await wait_until_async(lambda: first.description is not None, 10, "the first server described")
                errored.hold_health.set()
                await wait_until_async(lambda: not second.up, 10, "the second server ejected")
                errored.hold.set()  # a description it might have been asked for arrives now
                healthy = await round_
            return second.address, healthy, second.up, second.description, errored.described
        finally:
            errored.hold_health.set()
            errored.hold.set()
            await pool.close()

    address, healthy, up, description, asked = with_servers(scenario)
    assert (healthy, up, description, asked) == (1, False, None, 0)
    assert caplog.messages == [f"language server {address} ejected: the server reports it is not ready"]


def test_describe_lists_the_servers_that_answered_and_re_admits_them(caplog):
    starting, down = Language(endpoint="tcp://10.0.0.2:7"), Language(endpoint="tcp://10.0.0.3:7")
    starting.refuse = grpc.StatusCode.UNAVAILABLE

    async def scenario(servers):
        addresses = [await servers.start(starting), await servers.start(down)]
        pool = LanguagePool(addresses)
        try:
            with caplog.at_level("INFO", logger="gateway.pools"):
                for backend in pool.backends:
                    backend.mark_down("test")  # no server passes: describe asks them all
                first = [x.address for x in await pool.describe()]
                starting.refuse = None
                second = [x.address for x in await pool.describe()]
            return (addresses, first, second, [x.up for x in pool.backends],
                    [sample("dvd_gateway_backend_up", "language", x) for x in addresses])
        finally:
            await pool.close()

    addresses, first, second, up, series = with_servers(scenario)
    assert first == second == [addresses[1]] and up == [False, True] and series == [0, 1]
    assert (starting.described, down.described) == (1, 1)  # a server passes again: the one still down waits
    assert caplog.messages[2:] == [f"language server {addresses[0]} not ready: UNAVAILABLE",
                                   f"language server {addresses[1]} re-admitted"]


def test_describe_gives_up_on_a_server_after_the_timeout_in_a_health_check_and_when_asked(caplog):
    silent = Language()

    async def scenario(servers):
        silent.hold = asyncio.Event()
        pool = LanguagePool([await servers.start(silent)])
        try:
            with caplog.at_level("INFO", logger="gateway.pools"):
                healthy = await asyncio.wait_for(pool.check(0.05), 10)
                listed = await asyncio.wait_for(pool.describe(timeout_s=0.05), 10)
            return pool.backends[0].address, healthy, listed, silent.described
        finally:
            silent.hold.set()
            await pool.close()

    address, healthy, listed, asked = with_servers(scenario)
    assert healthy == 1 and listed == [] and asked == 2
    assert caplog.messages == [f"language server {address} not ready: DEADLINE_EXCEEDED"] * 2


def test_a_server_re_admitted_by_describe_after_refusing_counts_its_late_answers_from_none(caplog):
    """A language server refuses a health check (restarting) and is ejected; a request's `describe` finds it
    answering and re-admits it; two late health answers then keep it (it takes three in a row)."""
    restarting = Language(endpoint="tcp://10.0.0.6:7")

    async def scenario(servers):
        pool = LanguagePool([await servers.start(restarting)])
        backend = pool.backends[0]
        try:
            seen = [await pool.check(5)]
            restarting.refuse_health = grpc.StatusCode.UNAVAILABLE
            seen.append(await pool.check(5))
            seen.append([x.description.feature_endpoint for x in await pool.describe()])
            restarting.refuse_health, restarting.hold_health = None, asyncio.Event()
            for _ in range(2):
                seen.append((await asyncio.wait_for(pool.check(0.05), 10), backend.up))
            restarting.hold_health.set()
            return seen
        finally:
            await pool.close()

    assert with_servers(scenario) == [1, 0, ["tcp://10.0.0.6:7"], (1, True), (1, True)]


def test_replies_up_to_64_mib_are_taken():
    large = Language(model="m" * (5 << 20))  # over gRPC's default 4 MiB

    async def scenario(servers):
        pool = LanguagePool([await servers.start(large)])
        try:
            return [len(x.description.model) for x in await pool.describe()]
        finally:
            await pool.close()

    assert with_servers(scenario) == [5 << 20]


def test_calls_carry_the_internal_secret(caplog):
    guarded = Language(endpoint="tcp://10.0.0.4:7")

    async def scenario(servers):
        address = await servers.start(guarded, secret="s3cret")
        with_secret, without = LanguagePool([address], secret="s3cret"), LanguagePool([address])
        try:
            with caplog.at_level("INFO", logger="gateway.pools"):
                return address, [[x.description.feature_endpoint for x in await pool.describe()]
                                 for pool in (with_secret, without)]
        finally:
            await with_secret.close()
            await without.close()

    address, described = with_servers(scenario)
    assert described == [["tcp://10.0.0.4:7"], []]
    assert caplog.messages == [f"language server {address} not ready: UNAUTHENTICATED"]


def test_encode_calls_carry_the_internal_secret():
    guarded = Vision()

    async def scenario(servers):
        address = await servers.start(guarded, secret="s3cret")
        outcomes = []
        for request_id, pool in (("with", VisionPool([address], secret="s3cret")), ("without", VisionPool([address]))):
            try:
                with pool.lease() as backend:
                    await backend.stub.Encode(dvd_pb2.EncodeRequest(request_id=request_id), timeout=5)
                outcomes.append("encoded")
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.code().name)
            finally:
                await pool.close()
        return outcomes

    assert with_servers(scenario) == ["encoded", "UNAUTHENTICATED"] and guarded.encoded == ["with"]


def test_closing_a_pool_closes_its_channels():
    async def scenario(servers):
        pool = VisionPool([await servers.start(Vision()), await servers.start(Vision())])
        await pool.close()
        return [await closed(x.stub) for x in pool.backends]

    assert with_servers(scenario) == ["refused: Channel is closed."] * 2


DAY = datetime.timedelta(days=1)


class Authority:
    """A throw-away certificate authority writing PEM files; its certificates name one host only (no IP address),
    so a pool reaching servers by IP needs the name to check (`server_name`)."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.key = folder, ec.generate_private_key(ec.SECP256R1())
        self.cert = self._sign(name, self.key.public_key(), ca=True)
        self.ca = self.cert.public_bytes(serialization.Encoding.PEM)

    def _sign(self, name: str, public_key, ca: bool = False) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(subject if ca else self.cert.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - DAY).not_valid_after(now + DAY))
        builder = (builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True) if ca else
                   builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False))
        return builder.sign(self.key, hashes.SHA256())

    def issue(self, name: str) -> tuple[bytes, bytes]:
        """(certificate, key) PEM for `name`."""
        key = ec.generate_private_key(ec.SECP256R1())
        return (self._sign(name, key.public_key()).public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def put(path: Path, content: bytes) -> None:
    """Replace `path` as a rotation does (a new file moved in place)."""
    path.with_suffix(".new").write_bytes(content)
    os.replace(path.with_suffix(".new"), path)


def server_credentials(authority: Authority) -> grpc.ServerCredentials:
    """TLS for a server named "servers", taking only clients with a certificate from `authority`."""
    cert, key = authority.issue("servers")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=authority.ca, require_client_auth=True)


def gateway_files(folder: Path, authority: Authority, trusted: bytes) -> TlsFiles:
    cert, key = authority.issue("gateway")
    for name, content in (("tls.crt", cert), ("tls.key", key), ("ca.crt", trusted)):
        put(folder / name, content)
    return TlsFiles(tls_cert_file=folder / "tls.crt", tls_key_file=folder / "tls.key", tls_ca_file=folder / "ca.crt")


def test_a_tls_pool_checks_the_servers_certificate_by_the_name_given_and_sends_the_secret(tmp_path, caplog):
    authority = Authority(tmp_path, "ca")
    files = gateway_files(tmp_path, authority, authority.ca)
    guarded = Language(endpoint="tcp://10.0.0.5:7")

    async def scenario(servers):
        address = await servers.start(guarded, credentials=server_credentials(authority), secret="s3cret")
        pools = [LanguagePool([address], secret="s3cret", tls=files, server_name="servers"),
                 LanguagePool([address], secret="s3cret", tls=files), LanguagePool([address], secret="s3cret")]
        try:
            with caplog.at_level("WARNING", logger="gateway.pools"):
                healthy = [await pool.check(5) for pool in pools]
            return address, healthy, [x.description.feature_endpoint for x in await pools[0].describe()]
        finally:
            for pool in pools:
                await pool.close()

    address, healthy, described = with_servers(scenario)
    assert healthy == [1, 0, 0] and described == ["tcp://10.0.0.5:7"]
    assert caplog.messages == [f"language server {address} ejected: health check failed: UNAVAILABLE"] * 2


def test_rotated_tls_files_give_new_channels_at_the_next_check_and_files_that_do_not_load_keep_the_old(
        tmp_path, caplog):
    """The gateway's CA file is first another CA's (the servers' certificates fail), then the right one: the next
    check reconnects with it and closes the old channels. A key that does not go with the certificate, then a
    missing file, are each warned about once and leave the channels as they were."""
    authority, other = Authority(tmp_path, "ca"), Authority(tmp_path, "other")
    files = gateway_files(tmp_path, authority, other.ca)

    async def scenario(servers):
        credentials = server_credentials(authority)
        addresses = [await servers.start(Vision(), credentials=credentials) for _ in range(2)]
        pool = VisionPool(addresses, tls=files, server_name="servers")
        try:
            seen = []
            with caplog.at_level("INFO", logger="gateway.pools"):
                seen.append(await pool.check(5))
                seen.append(await pool.check(5))  # files unchanged: nothing reloaded
                old = [x.stub for x in pool.backends]
                put(files.tls_ca_file, authority.ca)
                seen.append(await pool.check(5))
                seen += [await closed(stub) for stub in old]
                current = [x.stub for x in pool.backends]
                put(files.tls_key_file, authority.issue("stray")[1])
                seen.append(await pool.check(5))
                seen.append(await pool.check(5))  # the same broken files: not tried again
                files.tls_ca_file.unlink()
                seen.append(await pool.check(5))
                seen.append([x.stub for x in pool.backends] == current)
            return addresses, seen
        finally:
            await pool.close()

    addresses, seen = with_servers(scenario)
    assert seen == [0, 0, 2, "refused: Channel is closed.", "refused: Channel is closed.", 2, 2, 2, True]
    key, ca = files.tls_key_file, files.tls_ca_file
    assert sorted(caplog.messages[:2]) == sorted(f"vision server {x} ejected: health check failed: UNAVAILABLE"
                                                 for x in addresses)
    assert caplog.messages[2] == "TLS certificate reloaded: new channels to 2 vision servers"
    assert sorted(caplog.messages[3:5]) == sorted(f"vision server {x} re-admitted" for x in addresses)
    assert caplog.messages[5].startswith("TLS files changed but did not load, vision servers keep the previous ones: "
                                         f"{files.tls_cert_file} does not go with {key}: ")
    assert caplog.messages[6:] == ["TLS files changed but did not load, vision servers keep the previous ones: "
                                   f"[Errno 2] No such file or directory: '{ca}'"]


def test_the_health_loop_checks_every_pool_each_round_and_outlives_a_failing_one(caplog):
    """A pool whose check raises (a name that cannot even be encoded) is logged with its error every round; the
    next pool is still checked, and its late server ejected at the third round."""
    late = Vision()

    async def scenario(servers):
        late.hold = asyncio.Event()
        broken = LanguagePool([f"dns:{'x' * 64}.test:1"])
        pool = VisionPool([await servers.start(late)])
        loop = asyncio.create_task(check_forever([broken, pool], interval_s=0.01, timeout_s=0.05))
        try:
            with caplog.at_level("ERROR", logger="gateway.pools"):
                await wait_until_async(lambda: not pool.backends[0].up, 10, "the late server ejected")
            return loop.done(), late.checks
        finally:
            loop.cancel()
            late.hold.set()
            await pool.close()

    done, checks = with_servers(scenario)
    assert not done and checks >= 3
    errors = [(r.getMessage(), r.exc_info[0]) for r in caplog.records if r.levelname == "ERROR"]
    assert errors[:3] == [("health check of language servers failed", UnicodeError)] * 3


def test_between_rounds_only_ejected_servers_are_checked_again_so_one_coming_up_is_back_within_that_interval():
    """Rounds an hour apart: a server that said it is not ready is checked every few milliseconds and re-admitted
    once it says it is ready, then left for the next round like the server that never left; that one is checked
    by the first round only."""
    healthy, starting = Vision(), Vision(ready=False)

    async def scenario(servers):
        pool = VisionPool([await servers.start(healthy), await servers.start(starting)])
        loop = asyncio.create_task(check_forever([pool], interval_s=3600, timeout_s=5, ejected_interval_s=0.01))
        try:
            await wait_until_async(lambda: starting.checks >= 3, 10, "the unready server checked between rounds")
            up_while_starting = [b.up for b in pool.backends]
            starting.ready = True
            await wait_until_async(lambda: pool.backends[1].up, 10, "the ready server re-admitted")
            at_readmission = starting.checks
            await asyncio.sleep(0.2)  # twenty ejected-server intervals: none of them checks it now
            return up_while_starting, healthy.checks, at_readmission, starting.checks, loop.done()
        finally:
            loop.cancel()
            await pool.close()

    up_while_starting, healthy_checks, at_readmission, later, done = with_servers(scenario)
    assert up_while_starting == [True, False] and not done
    assert healthy_checks == 1
    assert later == at_readmission


def test_an_ejected_server_that_never_answers_is_checked_at_the_timeout_s_pace_and_the_pool_at_the_rounds():
    """Rounds 0.9 s apart and a server out of the pool whose health calls hang: each check of it ends at the health
    timeout and the next follows, while the server in the pool waits for the next round."""
    healthy, silent = Vision(), Vision(ready=False)

    async def scenario(servers):
        pool = VisionPool([await servers.start(healthy), await servers.start(silent)])
        loop = asyncio.create_task(check_forever([pool], interval_s=0.9, timeout_s=0.05, ejected_interval_s=0.01))
        try:
            await wait_until_async(lambda: not pool.backends[1].up, 10, "the unready server ejected")
            silent.hold = asyncio.Event()  # its health calls answer no more
            before = silent.checks
            await wait_until_async(lambda: silent.checks >= before + 5, 10, "the silent server checked five times")
            return healthy.checks, loop.done()
        finally:
            loop.cancel()
            if silent.hold is not None:
                silent.hold.set()
            await pool.close()

    healthy_checks, done = with_servers(scenario)
    assert healthy_checks <= 2 and not done
