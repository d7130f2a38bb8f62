"""Tenants, in process (the gateway on httpx.ASGITransport before scripted servers, tests/gateway_fakes.py):
stored responses are their creator's, caches are scoped per tenant (and per `cache_salt`), each key has its own
limits and metric label, and no key reaches a log line, a metric, an error or a server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import SimpleNamespace

import openai
import pytest
import torch
from gateway_fakes import MODEL, FakeLanguage, FakeVision, gateway, run
from pydantic import ValidationError

from conftest import data_url, make_image, png_bytes
from gateway import metrics
from gateway.settings import GatewaySettings, load_settings
from gateway.tenants import Tenants
from launcher import wait_until_async
from proto import dvd_pb2
from vision_server import metrics as vision_metrics
from vision_server.engine import EncodedImage
from vision_server.service import VisionService
from vision_server.settings import VisionServerSettings

KEY_A = "sk-acme-7c1f0e9d2b"  # named "acme" in the settings
KEY_B = "sk-other-4a8e61d0c3"  # unnamed: "key-1", the first key
TENANTS = {"api_keys": [KEY_B], "tenants": [{"name": "acme", "key": KEY_A}]}
IMAGE = data_url(make_image(40, 30, 5))
HI = [{"role": "user", "content": "hi"}]


def image_chat(url: str = IMAGE, detail: str = "auto") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": detail}},
                                         {"type": "text", "text": "what is this?"}]}]


@contextlib.asynccontextmanager
async def two_tenants(language: FakeLanguage | None = None, vision: FakeVision | None = None, **settings):
    """The gateway with keys A ("acme") and B ("key-1"); yields their `openai` clients and a keyless httpx client."""
    async with gateway(language, vision, **{**TENANTS, **settings}) as (_, http):
        def client(key: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=key, http_client=http, max_retries=0)

        yield client(KEY_A), client(KEY_B), http


def finish(text: str = "ok") -> dvd_pb2.GenerateResponse:
    return dvd_pb2.GenerateResponse(text=text, token_ids=[1], finish_reason="stop",
                                    usage=dvd_pb2.Usage(prompt_tokens=5, completion_tokens=1))


# ---------------------------------------------------------------- stored responses


def test_another_key_gets_404_for_a_stored_response_by_get_previous_response_id_and_delete_as_for_an_unknown_id():
    language = FakeLanguage()

    async def main():
        async with two_tenants(language) as (a, b, http):
            made = await a.responses.create(model=MODEL, input="a secret question")
            outcomes = {}
            for name, call in {"get": b.responses.retrieve(made.id),
                               "continue": b.responses.create(model=MODEL, input="and?", previous_response_id=made.id),
                               "delete": b.responses.delete(made.id)}.items():
                with pytest.raises(openai.NotFoundError) as refused:
                    await call
                outcomes[name] = refused.value.response.json()
            unknown = (await http.get("/v1/responses/resp_unknown", headers={"authorization": f"Bearer {KEY_B}"}))
            mine = await a.responses.retrieve(made.id)
        return made, outcomes, unknown.json(), mine

    made, outcomes, unknown, mine = run(main())
    assert mine.id == made.id and mine.output_text == "ok"
    assert len(language.requests) == 1  # B's continuation never reached a server
    for name, body in outcomes.items():  # nothing tells B that the id exists
        assert body["error"] == {**unknown["error"], "message": unknown["error"]["message"].replace(
            "resp_unknown", made.id), "param": "previous_response_id" if name == "continue" else None}, name


def test_the_owner_deletes_its_response_and_then_it_is_gone():
    async def main():
        async with two_tenants() as (a, b, http):
            made = await a.responses.create(model=MODEL, input="hi")
            deleted = await http.delete(f"/v1/responses/{made.id}", headers={"authorization": f"Bearer {KEY_A}"})
            gone = []
            for call in (a.responses.retrieve(made.id), a.responses.delete(made.id),
                         a.responses.create(model=MODEL, input="more", previous_response_id=made.id)):
                with pytest.raises(openai.NotFoundError, match="is not stored here"):
                    await call
                gone.append(True)
            again = await a.responses.create(model=MODEL, input="hi")
            await a.responses.delete(again.id)  # the official client's call
        return made, deleted, gone

    made, deleted, gone = run(main())
    assert deleted.status_code == 200
    assert deleted.json() == {"id": made.id, "object": "response.deleted", "deleted": True}
    assert gone == [True] * 3


def test_without_keys_the_deployment_is_one_tenant_sharing_its_stored_responses():
    async def main():
        async with gateway() as (client, http):
            made = await client.responses.create(model=MODEL, input="hi")
            fetched = await http.get(f"/v1/responses/{made.id}", headers={"authorization": "Bearer anything"})
            deleted = await http.delete(f"/v1/responses/{made.id}")
        return made, fetched, deleted

    made, fetched, deleted = run(main())
    assert fetched.status_code == 200 and fetched.json()["id"] == made.id
    assert deleted.json()["deleted"] is True


# ---------------------------------------------------------------- caches


def holding(language_requests_before_reply: list[int], vision: FakeVision):
    """A language server's script that holds every image key it was sent once (a feature cache), and records
    how many Encode calls had been made when each request got its `missing` reply."""
    held: set[str] = set()
    misses = 0  # requests answered "missing" so far: each one's Encode is expected before its reply

    async def script(request, server):
        nonlocal misses
        missing = [i for i, key in enumerate(request.image_keys) if key not in held]
        held.update(request.image_keys)
        if request.image_keys:
            if missing:  # an image the gateway thought held would be encoded only after this reply
                misses += 1
                with contextlib.suppress(TimeoutError):
                    await wait_until_async(lambda: len(vision.requests) >= misses, 10, "this request's Encode")
            language_requests_before_reply.append(len(vision.requests))
            yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages(image_indices=missing))
        yield finish()

    return script


def test_an_image_one_tenant_sent_is_keyed_salted_and_encoded_anew_for_another():
    """A's second turn finds its image held (no Encode, same key, same prefix salt); B's first request with the
    same image gets other keys and another salt, and its Encode leaves at once under B's own scope."""
    vision, encodes_before_reply = FakeVision(), []
    language = FakeLanguage(holding(encodes_before_reply, vision))

    async def main():
        async with two_tenants(language, vision) as (a, b, _):
            for client in (a, a, b):
                await client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=2)

    run(main())
    first, second, other = language.requests
    assert first.image_keys == second.image_keys and first.cache_salt == second.cache_salt
    assert set(other.image_keys).isdisjoint(first.image_keys) and other.cache_salt != first.cache_salt
    assert all(len(r.cache_salt) == 64 for r in language.requests)  # hex HMACs, within vLLM's 128 characters
    assert encodes_before_reply == [1, 1, 2]  # A's second turn encoded nothing; B's image went at once
    assert [e.cache_scope for e in vision.requests] == [first.cache_salt, other.cache_salt]


def test_a_requests_cache_salt_separates_its_caches_within_its_tenant_and_never_joins_two_tenants():
    language = FakeLanguage()
    asks = [("a", None), ("a", "s1"), ("a", "s1"), ("a", "s2"), ("b", "s1")]

    async def main(**settings):
        language.requests.clear()
        async with two_tenants(language, **settings) as (a, b, _):
            for who, salt in asks:
                await {"a": a, "b": b}[who].chat.completions.create(
                    model=MODEL, messages=image_chat(), max_tokens=2, extra_body={"cache_salt": salt} if salt else {})
            await a.responses.create(model=MODEL, input=[{"role": "user", "content": [
                {"type": "input_image", "image_url": IMAGE}, {"type": "input_text", "text": "what is this?"}]}],
                extra_body={"cache_salt": "s1"})
        return [(r.cache_salt, tuple(r.image_keys)) for r in language.requests]

    scoped = run(main())
    a_plain, a_s1, a_s1_again, a_s2, b_s1, a_s1_responses = scoped
    assert a_s1 == a_s1_again == a_s1_responses  # one salt, one scope, on both APIs
    assert len({a_plain, a_s1, a_s2, b_s1}) == 4 and len({k for _, keys in scoped for k in keys}) == 4

    shared = run(main(share_caches_across_tenants=True))
    assert shared[0] == ("", shared[0][1])  # shared and unsalted: no salt at all, as without tenants
    assert shared[1] == shared[2] == shared[4] == shared[5]  # the same salt is the same scope for A and B
    assert len({shared[0], shared[1], shared[3]}) == 3  # a salt still separates


def test_shared_caches_give_every_tenant_the_same_image_keys_and_no_salt():
    vision = FakeVision()
    language = FakeLanguage()

    async def main():
        async with two_tenants(language, vision, share_caches_across_tenants=True) as (a, b, _):
            for client in (a, b):
                await client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=2)

    run(main())
    first, other = language.requests
    assert first.image_keys == other.image_keys and first.cache_salt == other.cache_salt == ""
    assert {e.cache_scope for e in vision.requests} == {""}


def test_without_keys_no_salt_is_sent_unless_the_request_brings_one():
    language = FakeLanguage()

    async def main():
        async with gateway(language) as (client, _):
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2,
                                                 extra_body={"cache_salt": "mine"})

    run(main())
    assert language.requests[0].cache_salt == "" and len(language.requests[1].cache_salt) == 64


@pytest.mark.parametrize("salt", ["", "x" * 1025])
def test_a_cache_salt_out_of_bounds_is_a_400_naming_it(salt):
    async def main():
        async with gateway() as (_, http):
            return await http.post("/v1/chat/completions",
                                   json={"model": MODEL, "messages": HI, "cache_salt": salt})

    reply = run(main())
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "cache_salt"


class GatedEngine:
    """A vision engine whose encodes wait for `gate`; counts them."""

    tiles_waiting = 0
    weights = "w"

    def __init__(self):
        self.gate, self.calls = asyncio.Event(), 0

    async def encode(self, request_id, image_index, pixels, vir=None) -> EncodedImage:
        self.calls += 1
        await self.gate.wait()
        return EncodedImage(torch.zeros(256 * pixels.shape[0], 8), [256] * pixels.shape[0])


class CountingSender:
    async def send(self, endpoint, item) -> int:
        return item.num_bytes


def test_the_vision_server_shares_an_in_flight_encode_only_within_one_cache_scope():
    """Two Encode calls of the same image at once: one encode when their scopes match, two when they differ."""

    async def encodes(scopes: list[str]) -> tuple[int, float]:
        engine = GatedEngine()
        service = VisionService([engine], SimpleNamespace(flash=False), VisionServerSettings(), CountingSender(),
                                model_name="tiny")
        dedup = vision_metrics.DEDUP_IMAGES._value.get()
        image = dvd_pb2.ImageInput(data=png_bytes(make_image(60, 40, 9)))
        calls = [asyncio.ensure_future(service.Encode(dvd_pb2.EncodeRequest(
            request_id=f"r{i}", images=[image], feature_endpoint="tcp://127.0.0.1:9", cache_scope=scope), None))
            for i, scope in enumerate(scopes)]
        # Both calls wait: each on its own encode, or both on one (a private count: no API tells it).
        await wait_until_async(lambda: sum(s.waiters for s in service._in_flight._shared.values()) == len(scopes),
                               10, "both Encode calls wait for the encoder")
        engine.gate.set()
        replies = await asyncio.gather(*calls)
        service.close()
        assert all(len(r.images) == 1 for r in replies)
        return engine.calls, vision_metrics.DEDUP_IMAGES._value.get() - dedup

    assert run(encodes(["tenant-a", "tenant-a"])) == (1, 1)
    assert run(encodes(["tenant-a", "tenant-b"])) == (2, 0)


# ---------------------------------------------------------------- limits


def held_until(release: asyncio.Event):
    async def script(request, server):
        if request.image_keys:
            yield dvd_pb2.GenerateResponse(missing=dvd_pb2.MissingImages(image_indices=range(request.image_count)))
        await release.wait()
        yield finish()

    return script


def counted(status: str, tenant: str) -> float:
    return metrics.REQUESTS.labels(status, tenant)._value.get()


def test_one_tenants_burst_gets_429_with_retry_after_while_another_tenant_is_served():
    release = asyncio.Event()
    language = FakeLanguage(held_until(release))
    settings = {"tenants": [{"name": "acme", "key": KEY_A, "max_in_flight": 2}], "max_in_flight": 10}

    async def main():
        before = {(s, t): counted(s, t) for s in ("200", "429") for t in ("acme", "key-1")}
        async with two_tenants(language, **settings) as (_, _, http):
            def post(key: str):
                return http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI},
                                 headers={"authorization": f"Bearer {key}"})

            held = [asyncio.ensure_future(post(KEY_A)) for _ in range(2)]
            await wait_until_async(lambda: len(language.requests) == 2, 10, "A's two requests are in flight")
            refused = [await post(KEY_A) for _ in range(3)]
            served = [asyncio.ensure_future(post(KEY_B)) for _ in range(3)]
            await wait_until_async(lambda: len(language.requests) == 5, 10, "B's requests are in flight beside A's")
            in_flight = {t: metrics.IN_FLIGHT.labels(t)._value.get() for t in ("acme", "key-1")}
            release.set()
            done = await asyncio.gather(*held, *served)
        after = {key: counted(*key) - value for key, value in before.items()}
        return refused, done, in_flight, after

    refused, done, in_flight, counts = run(main())
    assert [r.status_code for r in refused] == [429] * 3 and refused[0].headers["retry-after"] == "1"
    assert refused[0].json()["error"]["message"] == \
        "tenant 'acme' has its limit of 2 requests in progress; retry later"
    assert [r.status_code for r in done] == [200] * 5
    assert in_flight == {"acme": 2, "key-1": 3}
    assert counts == {("200", "acme"): 2, ("429", "acme"): 3, ("200", "key-1"): 3, ("429", "key-1"): 0}


def test_a_tenants_queued_work_is_capped_by_the_tiles_its_requests_may_take():
    """Limit 13 tiles: an image at detail auto (12 tiles and a thumbnail) fills it; one more tile is refused, a
    text-only request is not; alone, a request over the limit runs."""
    release = asyncio.Event()
    language = FakeLanguage(held_until(release))
    settings = {"tenants": [{"name": "acme", "key": KEY_A, "max_tiles_in_flight": 13}]}

    async def main():
        async with two_tenants(language, **settings) as (a, b, _):
            big = asyncio.ensure_future(a.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=2))
            await wait_until_async(lambda: len(language.requests) == 1, 10, "the 13-tile request is in flight")
            with pytest.raises(openai.RateLimitError) as refused:
                await a.chat.completions.create(model=MODEL, messages=image_chat(detail="low"), max_tokens=2)
            text = asyncio.ensure_future(a.chat.completions.create(model=MODEL, messages=HI, max_tokens=2))
            other = asyncio.ensure_future(b.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=2))
            await wait_until_async(lambda: len(language.requests) == 3, 10, "the text-only and B's requests run")
            release.set()
            await asyncio.gather(big, text, other)
            two_images = image_chat() + image_chat(data_url(make_image(50, 30, 6)))
            alone = await a.chat.completions.create(model=MODEL, messages=two_images, max_tokens=2)
        return refused.value, alone

    refused, alone = run(main())
    assert "tenant 'acme' has requests in progress that may take 13 tiles; with this one's 1 that passes its " \
           "limit of 13" in refused.message
    assert alone.choices[0].message.content == "ok"


def test_the_one_tenant_of_a_keyless_gateway_has_only_the_gateways_limit():
    release = asyncio.Event()
    language = FakeLanguage(held_until(release))

    async def main():
        async with gateway(language, tenant_max_in_flight=1, max_in_flight=3) as (client, _):
            calls = [asyncio.ensure_future(client.chat.completions.create(model=MODEL, messages=HI))
                     for _ in range(3)]
            await wait_until_async(lambda: len(language.requests) == 3, 10, "three requests are in flight")
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model=MODEL, messages=HI)
            release.set()
            await asyncio.gather(*calls)
        return refused.value

    assert "the gateway is serving its limit of 3 requests" in run(main()).message


# ---------------------------------------------------------------- metrics, logs and settings


def test_request_metrics_are_labelled_by_the_keys_name_and_keys_never_appear(caplog):
    """Every log line (debug included), metric, error body and message sent to a server is searched for the
    keys: none holds one. Metrics carry the configured name, key-N for an unnamed key, "-" before auth."""
    caplog.set_level(logging.DEBUG)
    vision, language = FakeVision(), FakeLanguage()
    bodies: list = []

    async def main():
        async with two_tenants(language, vision, tenants=[{"name": "acme", "key": KEY_A, "max_in_flight": 1}]) \
                as (a, b, http):
            made = await a.responses.create(model=MODEL, input=[{"role": "user", "content": [
                {"type": "input_image", "image_url": IMAGE}, {"type": "input_text", "text": "hi"}]}])
            await b.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=2, stream=True)
            for authorization in (f"Bearer {KEY_A}x", f"Bearer {KEY_A[:-1]}", f"Bearer {KEY_B.upper()}",
                                  f"Basic {KEY_A}", KEY_A, "Bearer"):
                bodies.append(await http.get("/v1/models", headers={"authorization": authorization}))
            bodies.append(await http.get(f"/v1/responses/{made.id}", headers={"authorization": f"Bearer {KEY_B}"}))
            bodies.append(await http.post("/v1/chat/completions", json={"model": "nope", "messages": HI},
                                          headers={"authorization": f"Bearer {KEY_A}"}))
            return (await http.get("/metrics")).text

    page = run(main())
    assert [r.status_code for r in bodies] == [401] * 6 + [404, 404]
    assert 'dvd_gateway_requests_total{status="200",tenant="acme"}' in page
    assert 'dvd_gateway_requests_total{status="200",tenant="key-1"}' in page
    assert 'dvd_gateway_requests_total{status="401",tenant="-"}' in page
    assert 'dvd_gateway_ttft_seconds_count{tenant="key-1"}' in page
    assert 'dvd_gateway_request_seconds_count{tenant="acme"}' in page
    sent = [m.SerializeToString() for m in [*vision.requests, *language.requests]]
    assert len(caplog.records) > 10 and len(sent) == 4
    for key in (KEY_A, KEY_B):
        assert key not in caplog.text and key not in page and not any(key in r.text for r in bodies)
        assert not any(key.encode() in message for message in sent)


def test_tenants_come_from_the_settings_file_with_names_and_their_own_limits(tmp_path, monkeypatch):
    (tmp_path / "gateway.toml").write_text(
        'api_keys = ["k-plain"]\ntenant_max_in_flight = 16\n\n'
        '[[tenants]]\nname = "acme"\nkey = "k-acme"\nmax_in_flight = 2\nmax_tiles_in_flight = 40\n\n'
        '[[tenants]]\nkey = "k-anon"\n')
    settings = load_settings(tmp_path / "gateway.toml")
    tenants = Tenants(settings)
    found = {key: tenants.authenticate(f"Bearer {key}") for key in ("k-plain", "k-acme", "k-anon")}
    assert [(t.name, t.max_in_flight, t.max_tiles_in_flight) for t in found.values()] == \
        [("key-1", 16, 0), ("acme", 2, 40), ("key-3", 16, 0)]
    assert "k-acme" not in repr(settings) and "k-plain" not in str(settings.model_dump())

    monkeypatch.setenv("DVD_GATEWAY_TENANTS", '[{"name": "env-tenant", "key": "k-env"}]')
    assert Tenants(load_settings()).authenticate("Bearer k-env").name == "env-tenant"


@pytest.mark.parametrize("settings, words", [
    ({"api_keys": ["k-twice"], "tenants": [{"name": "a", "key": "k-twice"}]}, "API keys 1 and 2"),
    ({"tenants": [{"name": "a", "key": "k-one"}, {"name": "a", "key": "k-two"}]}, "tenant name 'a' is given to 2"),
    ({"api_keys": ["k-one"], "tenants": [{"name": "key-1", "key": "k-two"}]}, "tenant name 'key-1'"),
    ({"tenants": [{"name": "has space", "key": "k-one"}]}, "tenants.0.name"),
    ({"tenants": [{"key": "k-one", "max_in_flight": -1}]}, "tenants.0.max_in_flight"),
])
def test_bad_tenant_settings_are_refused_naming_the_problem_and_never_the_key(settings, words):
    with pytest.raises(ValidationError) as refused:
        GatewaySettings(**settings)
    assert words in str(refused.value)
    assert "k-twice" not in str(refused.value) and "k-one" not in str(refused.value)
