"""The gateway's server pools (gateway/pools.py), without servers: least-outstanding leases with an affinity that
gives way under load, the candidates when health checks disagree, `dns:` entries, and where images' features
were last taken."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from gateway.errors import APIError
from gateway.pools import FeatureHolders, VisionPool, join_address, split_target


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
    ("dns:vision:50051", ("vision", 50051)), ("dns://vision.svc:1", ("vision.svc", 1)), ("dns:[::1]:7", ("::1", 7))])
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
