"""The sustained-goodput search: `planner.sustained.rate_search` against fake systems of known capacity, and the
benchmark's search mode (`benchmarks.toolkit.search` through `bench`) against a fake OpenAI server."""

from __future__ import annotations

import asyncio
import functools
import json
import math

import pytest
from openai_fakes import models_reply, streamed_reply

from planner.sustained import Criterion, Record, drive, judge, rate_search

SERVICE_S = 1 / 7.3  # the fake system's capacity: 7.3 req/s
TPOT_S = 0.01


def fifo_system(rate: float, spiky_above: float | None = None) -> list[Record]:
    """A fake system: one server taking `SERVICE_S` per request, first come first served, requests arriving
    evenly at `rate` for a run as long as the benchmark's (200 requests and 60 s at least). Below its capacity
    nobody waits; above it each request waits longer than the one before. `spiky_above`: above this rate every
    20th request decodes at 10x the usual TPOT (5% of requests: p99 misses, p90 holds)."""
    count = max(200, math.ceil(rate * 60))
    records, free_at = [], 0.0
    for i in range(count):
        arrival = i / rate
        start = max(arrival, free_at)
        free_at = start + SERVICE_S
        spike = spiky_above is not None and rate > spiky_above and i % 20 == 0
        records.append(Record(arrival, free_at - arrival, TPOT_S * (10 if spike else 1)))
    return records


def searched(criterion: Criterion, precision: float, system=fifo_system, **search) -> tuple[dict, dict]:
    """The search's answer and every rate it ran (each exactly once) with its verdicts."""
    runs: dict[float, dict] = {}

    def run(rate: float) -> dict[float, bool]:
        assert rate not in runs, f"{rate} run twice"
        runs[rate] = {p: judge(system(rate), criterion, p).passed for p in (90.0, 99.0)}
        return runs[rate]

    return drive(rate_search((90.0, 99.0), precision=precision, **search), run), runs


@pytest.mark.parametrize("start, step", [(1.0, 2.0), (5.0, 1.5), (20.0, 1.5)])
def test_search_finds_a_fake_systems_capacity_within_its_precision(start, step):
    capacity = 1 / SERVICE_S
    found, runs = searched(Criterion(ttft_slo_s=5.0, tpot_slo_s=0.05), 0.05, start=start, step=step)
    # The answer is a rate that passed; the growing-queue test lets through at most ~1.3% past capacity here
    # (the last third's median TTFT must rise by 0.5 s, 10% of the SLO, over a 60 s run).
    assert capacity / 1.05 <= found[90.0] <= capacity * 1.02
    assert found[99.0] == found[90.0]  # no request is slower than another below capacity: p99 holds as p90
    assert runs[found[90.0]] == {90.0: True, 99.0: True}
    failing = min(rate for rate, verdicts in runs.items() if not verdicts[90.0] and rate > found[90.0])
    assert failing / found[90.0] <= 1.05  # bisected to the precision


def test_search_rejects_a_growing_queue_the_slo_has_not_caught():
    """TTFT SLO 30 s: at 1.2x the capacity the p90 TTFT of a 60 s run (11 s) is still within it, only the
    growing queue gives the overload away. Without the growth test the search would report about 1.5x the
    capacity, where the p90 TTFT reaches the SLO at the end of the run."""
    capacity = 1 / SERVICE_S
    overload = judge(fifo_system(1.2 * capacity), Criterion(ttft_slo_s=30.0, tpot_slo_s=0.05), 90.0)
    assert overload.within_slo and not overload.sustained and overload.reason == "queue growing"
    found, _ = searched(Criterion(ttft_slo_s=30.0, tpot_slo_s=0.05), 0.05)
    # the growth test lets a rise of 10% of the SLO (3 s) through: 40 s between the thirds' middles, x - 1 <= 7.5%
    assert capacity / 1.05 <= found[90.0] <= capacity * 1.075
    blind, _ = searched(Criterion(ttft_slo_s=30.0, tpot_slo_s=0.05, growth=math.inf), 0.05)
    assert blind[90.0] > 1.4 * capacity


def test_p99_is_searched_below_p90_on_the_same_runs():
    """Every 20th request is slow above 3 req/s: p99 holds only up to 3 req/s, p90 up to the capacity."""
    capacity = 1 / SERVICE_S
    found, runs = searched(Criterion(ttft_slo_s=5.0, tpot_slo_s=0.05), 0.05,
                           system=functools.partial(fifo_system, spiky_above=3.0))
    assert capacity / 1.05 <= found[90.0] <= capacity * 1.02
    assert 3.0 / 1.05 <= found[99.0] <= 3.0
    assert all(verdicts[90.0] for rate, verdicts in runs.items() if rate <= found[90.0])


def test_search_answers_zero_when_even_the_lowest_rate_fails_and_refuses_a_system_nothing_breaks():
    found, runs = searched(Criterion(ttft_slo_s=1e-6, tpot_slo_s=0.05), 0.1, start=1.0, step=2.0, lowest=0.1)
    assert found == {90.0: 0.0, 99.0: 0.0} and min(runs) >= 0.1 and len(runs) == 4  # 1, 1/2, 1/4, 1/8
    with pytest.raises(ValueError, match="no arrival rate up to 100 req/s breaks the SLOs"):
        searched(Criterion(ttft_slo_s=1e9, tpot_slo_s=1e9), 0.1, highest=100.0)


# ---------------------------------------------------------------- the benchmark's search mode, `bench`


def fake_server(answered: int):
    """An OpenAI-compatible server that streams 2-token replies to its first `answered` chat requests and refuses
    (HTTP 503) every later one: a server whose capacity ran out. Returns the transport and the chat request
    bodies in arrival order."""
    import httpx

    bodies: list[dict] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return models_reply()
        bodies.append(json.loads(request.content))
        if len(bodies) > answered:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return streamed_reply()

    return httpx.MockTransport(handle), bodies


def test_bench_search_mode_judges_each_rate_on_fresh_requests_and_records_the_answer(monkeypatch, tmp_path):
    """Warm-up 2, then runs of 4 requests from 8 req/s by x2: 8 and 16 are answered, 32 and the bisection's
    22.6 hit the refusals (unfinished requests: SLO missed). The answer is 16 at p90 and p99."""
    import httpx
    import openai

    from benchmarks.toolkit.options import LoadOptions, SearchOptions, WorkloadOptions
    from benchmarks.toolkit.sweep import bench, print_summary, write_results

    transport, bodies = fake_server(answered=2 + 4 + 4 + 2)
    monkeypatch.setattr(openai, "AsyncOpenAI", functools.partial(
        openai.AsyncOpenAI, http_client=httpx.AsyncClient(transport=transport)))
    workload = WorkloadOptions(image_size=["32x32"], input_words=3, output_len=2, warmup=2)
    search = SearchOptions(ttft_slo_ms=60_000, tpot_slo_ms=60_000, search_step=2, search_precision=0.5,
                           search_requests=4, search_seconds=0.1)
    options = LoadOptions(progress=False).run_options(workload.seed, {}, search.settings(start=8))
    assert options.points == [] and options.slos_ms == {"ttft": 60_000, "tpot": 60_000}
    document = asyncio.run(bench("http://127.0.0.1:9001", workload.batches(len(options.points)), options))

    found = document["sustained_goodput"]
    assert (found["p90_rps"], found["p99_rps"], found["runs"]) == (16.0, 16.0, 4)
    assert found["settings"]["run_length"] == "max(4 requests, 0.1 s x rate)"
    assert [round(p["request_rate"], 2) for p in document["points"]] == [8.0, 16.0, 32.0, 22.63]
    for point, ok in zip(document["points"], (True, True, False, False)):
        assert point["completed"] + point["failed"] == 4 and (point["failed"] == 0) == ok
        for verdict in point["search"]["verdicts"].values():
            assert verdict["passed"] == ok and verdict["within_slo"] == ok
            assert (verdict["ttft_s"] is None) == (not ok)  # a request that never finished: no finite percentile
    images = [part["image_url"]["url"] for body in bodies for part in body["messages"][0]["content"]
              if part["type"] == "image_url"]
    assert len(images) == 2 + 4 * 4 and len(set(images)) == len(images)  # no request's image sent twice

    csv_path = write_results(document, tmp_path / "search.json")
    header, *rows = csv_path.read_text().splitlines()
    assert "passed_p90" in header.split(",") and len(rows) == 4
    assert json.loads((tmp_path / "search.json").read_text())["sustained_goodput"]["p90_rps"] == 16.0
    print_summary(document)


def test_search_refuses_a_fixed_request_set(tmp_path):
    import typer

    from benchmarks.cli import refuse_fixed_requests
    from benchmarks.toolkit.options import WorkloadOptions

    with pytest.raises(typer.BadParameter, match="fresh requests at every rate"):
        refuse_fixed_requests(True, WorkloadOptions(jsonl=tmp_path / "w.jsonl"))
    refuse_fixed_requests(False, WorkloadOptions(jsonl=tmp_path / "w.jsonl"))
