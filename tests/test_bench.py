"""`dvd bench`: metric math against vLLM's own, workloads, JSONL errors, and a real run against `dvd up`."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from openai_fakes import models_reply, streamed_reply

from benchmarks.toolkit.loadgen import arrival_times
from benchmarks.toolkit.metrics import RequestResult, summarize
from benchmarks.toolkit.workload import (
    BenchRequest,
    RequestBatches,
    WorkloadError,
    from_folder,
    read_jsonl,
    synthetic,
    write_jsonl,
)
from conftest import free_port, make_image, png_bytes
from launcher import OFFLINE_ENV, Servers, Stack

DVD = [sys.executable, "-m", "dvd.cli"]
ENV = {**os.environ, **OFFLINE_ENV}


def hand_made() -> list[RequestResult]:
    """Three requests: 11 tokens at 100 ms each after a 100 ms TTFT; one single-token reply; one failure."""
    return [
        RequestResult(success=True, ttft=0.1, itl=[0.1] * 10, latency=1.1, prompt_tokens=300, output_tokens=11),
        RequestResult(success=True, ttft=0.2, itl=[], latency=0.2, prompt_tokens=100, output_tokens=1),
        RequestResult(success=False, error="HTTP 400: bad image"),
    ]


def test_metrics_on_hand_made_timings_have_the_known_values():
    m = summarize(hand_made(), duration_s=2.0, percentiles=[50, 90, 99], slos_ms={"ttft": 150})
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["failure_reasons"] == {"HTTP 400: bad image": 1}
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(6.0)  # 12 tokens / 2 s
    assert m["total_token_throughput"] == pytest.approx(206.0)  # (400 + 12) / 2 s
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["p99_ttft_ms"] == pytest.approx(199.0)  # linear interpolation between 100 and 200
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # the single-token reply has no TPOT
    assert m["mean_itl_ms"] == pytest.approx(100.0)
    assert m["median_e2el_ms"] == pytest.approx(650.0)
    assert m["request_goodput"] == pytest.approx(0.5)  # only the first request meets TTFT <= 150 ms
    # for goodput a single-token reply counts with TPOT 0: under a 50 ms TPOT limit the second request is
    # good and the first (100 ms) is not
    assert summarize(hand_made(), 2.0, [99], {"tpot": 50})["request_goodput"] == pytest.approx(0.5)


def test_metrics_agree_with_vllm_bench_serve_on_random_timings():
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    rng = np.random.default_rng(3)
    ours, theirs = [], []
    for i in range(40):
        tokens = int(rng.integers(1, 30))
        ttft, itl = float(rng.uniform(0.05, 2)), list(rng.uniform(0.001, 0.2, size=tokens - 1))
        ok = i % 7 != 3
        ours.append(RequestResult(success=ok, ttft=ttft, itl=itl, latency=ttft + sum(itl), prompt_tokens=50 + i,
                                  output_tokens=tokens, error="" if ok else "boom"))
        theirs.append(RequestFuncOutput(success=ok, ttft=ttft, itl=itl, latency=ttft + sum(itl), prompt_len=50 + i,
                                        output_tokens=tokens, error="" if ok else "boom"))
    slos = {"ttft": 1000.0, "tpot": 100.0}
    vllm_metrics, _ = calculate_metrics([], theirs, 12.5, None, [50, 90, 99], slos)
    m = summarize(ours, 12.5, [50, 90, 99], slos)
    for name in ("completed", "failed", "request_throughput", "request_goodput", "output_throughput",
                 "total_token_throughput"):
        assert m[name] == pytest.approx(getattr(vllm_metrics, name)), name
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std"):
            assert m[f"{stat}_{metric}_ms"] == pytest.approx(getattr(vllm_metrics, f"{stat}_{metric}_ms"))
        for p, value in getattr(vllm_metrics, f"percentiles_{metric}_ms"):
            assert m[f"p{int(p)}_{metric}_ms"] == pytest.approx(value)


def test_summarize_refuses_unknown_slos_and_empty_durations():
    with pytest.raises(ValueError, match="itl"):
        summarize(hand_made(), 1.0, [99], {"itl": 5})
    with pytest.raises(ValueError, match="duration"):
        summarize(hand_made(), 0.0, [99])


def test_arrivals_are_poisson_by_seed_and_end_at_requests_over_rate():
    a = arrival_times(50, 4.0, 1.0, np.random.default_rng(7))
    assert a == arrival_times(50, 4.0, 1.0, np.random.default_rng(7))
    assert a != arrival_times(50, 4.0, 1.0, np.random.default_rng(8))
    assert a[-1] == pytest.approx(50 / 4.0) and all(x < y for x, y in zip(a, a[1:]))
    assert arrival_times(3, math.inf, 1.0, np.random.default_rng(0)) == [0.0, 0.0, 0.0]


def test_synthetic_workload_is_the_same_for_the_same_seed():
    args = dict(num_requests=4, sizes=[(448, 448), (896, 448)], images_per_request=2, input_words=16, output_len=8)
    first = synthetic(**args, seed=5)
    assert first == synthetic(**args, seed=5)
    assert first != synthetic(**args, seed=6)
    assert all(len(r.images) == 2 and len(r.prompt.split()) == 16 and r.output_len == 8 for r in first)


def test_fresh_workloads_never_send_a_request_twice_and_files_repeat_whole():
    requests = synthetic(2 + 3 * 4, [(32, 32)], 1, 4, 2, seed=0)
    fresh = RequestBatches.fresh(requests, warmup=2, points=3, described={})
    sent = fresh.warmup + [r for batch in fresh.batches for r in batch]
    assert [len(b) for b in fresh.batches] == [4, 4, 4] and len(set(sent)) == len(sent) == 14
    repeated = RequestBatches.repeated(requests[:3], warmup=4, points=2, described={})
    assert repeated.batches == [requests[:3]] * 2 and repeated.warmup == requests[:3] + requests[:1]


def test_folder_workloads_use_every_image_in_a_seeded_order(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(make_image(16, 16, i)))
    (tmp_path / "notes.txt").write_text("not an image")
    requests = from_folder(tmp_path, num_requests=3, images_per_request=2, input_words=3, output_len=4, seed=1)
    assert requests == from_folder(tmp_path, 3, 2, 3, 4, seed=1)
    images = [url for r in requests for url in r.images]
    assert len(set(images[:3])) == 3 and images[3:] == images[:3]  # every image once, then again in turn
    assert all(url.startswith("data:image/png;base64,") for url in images)
    with pytest.raises(WorkloadError, match="no images"):
        from_folder(tmp_path / "notes.txt", 1, 1, 1, 1, seed=0)


def test_jsonl_round_trip_keeps_every_request(tmp_path):
    requests = synthetic(3, [(64, 32)], 1, 5, 7, seed=1) + [BenchRequest("text only", (), 4)]
    write_jsonl(requests, tmp_path / "w.jsonl")
    assert read_jsonl(tmp_path / "w.jsonl") == requests
    assert {r.output_len for r in read_jsonl(tmp_path / "w.jsonl", output_len=9)} == {9}


def test_jsonl_reads_image_files_relative_to_the_file(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(make_image(40, 30, 0)))
    (tmp_path / "w.jsonl").write_text('{"prompt": "hi", "image_files": ["a.png"], "output_tokens": 3}\n')
    [request] = read_jsonl(tmp_path / "w.jsonl")
    assert request.images[0].startswith("data:image/png;base64,")


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "x", "output_tokens": 2', "invalid JSON"),
    ('["x"]', "expected a JSON object"),
    ('{"output_tokens": 2}', "'prompt'"),
    ('{"prompt": "x", "output_tokens": 0}', "'output_tokens'"),
    ('{"prompt": "x"}', "no 'output_tokens'"),
    ('{"prompt": "x", "output_tokens": 2, "images": []}', "unknown field"),
    ('{"prompt": "x", "output_tokens": 2, "image_files": "a.png"}', "must be a list"),
    ('{"prompt": "x", "output_tokens": 2, "image_files": ["missing.png"]}', "missing.png"),
])
def test_jsonl_errors_name_the_line_and_the_problem(tmp_path, line, message):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "fine", "output_tokens": 2}\n\n' + line + "\n")
    with pytest.raises(WorkloadError, match=message) as error:
        read_jsonl(path)
    assert f"{path}:3:" in str(error.value)


def result_document(throughputs: list[float], **workload) -> dict:
    points = [{"request_rate": "inf", "max_concurrency": c, "completed": 4, "failed": 0, "request_throughput": t,
               "output_throughput": 10 * t, "mean_ttft_ms": 100 / t, "p50_ttft_ms": 90 / t, "p90_ttft_ms": 95 / t,
               "p99_ttft_ms": 99 / t, "mean_tpot_ms": 5.0, "p50_tpot_ms": 5.0, "p90_tpot_ms": 6.0,
               "p99_tpot_ms": 7.0, "mean_itl_ms": 5.0, "mean_e2el_ms": 300.0, "p99_e2el_ms": 400.0}
              for c, t in zip((1, 4), throughputs)]
    return {"command": "dvd bench run", "started": "now", "target": {"base_url": "http://x"}, "machine": {},
            "versions": {}, "load_avg_before": [0.1], "load_avg_after": [0.2], "settings": {},
            "workload": {"source": "synthetic", **workload}, "points": points}


def test_comparison_writes_a_table_with_ratios_and_three_plots(tmp_path):
    from benchmarks.report import write_comparison

    table = write_comparison({"DvD": result_document([2.0, 6.0]), "coupled": result_document([1.0, 3.0])},
                             tmp_path / "bench_x_compare")
    text = table.read_text()
    assert "| DvD | 4 | 4 / 0 | 6.00 |" in text and "| 4 | 2.00x | 0.50x |" in text
    for suffix in ("throughput", "ttft", "tpot"):
        png = tmp_path / f"bench_x_compare_{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in text


def test_comparison_refuses_runs_of_different_workloads(tmp_path):
    from benchmarks.report import write_comparison

    with pytest.raises(ValueError, match="different workloads"):
        write_comparison({"DvD": result_document([1.0, 2.0], seed=1), "coupled": result_document([1.0, 2.0], seed=2)},
                         tmp_path / "c")



def searched_document(p90: float, p99: float, **settings) -> dict:
    """A results document of a search only (no load points): two runs and the answer."""
    from benchmarks.toolkit.search import GoodputSearch

    document = result_document([1.0])
    document["points"] = [search_run(p90, (True, p99 == p90)), search_run(p90 * 1.2, (False, False), growth=3.0)]
    document["sustained_goodput"] = {"p90_rps": p90, "p99_rps": p99, "runs": 2,
                                     "settings": GoodputSearch(**settings).described()}
    return document


def test_comparison_leads_with_the_sustained_goodput_ratio_and_plots_the_search(tmp_path):
    from benchmarks.report import write_comparison

    table = write_comparison({"DvD": searched_document(6.0, 4.5), "coupled": searched_document(4.0, 4.0)},
                             tmp_path / "bench_s_compare")
    text = table.read_text()
    assert "## Sustained goodput: DvD / coupled" in text and "max(200 requests, 60 s x rate) fresh requests" in text
    assert "| p90 | 6 | 4 | **1.50x** |" in text and "| p99 | 4.5 | 4 | **1.12x** |" in text
    assert "| DvD | 7.2 | 200 / 0 | fail (queue growing) | fail (queue growing) |" in text
    assert "## Load points" not in text  # a search alone: no sweep table, no sweep plots
    assert [p.name for p in tmp_path.glob("*.png")] == ["bench_s_compare_search.png"]
    assert text.index("Sustained goodput") < text.index("![bench_s_compare_search]")


def test_comparison_refuses_searches_under_different_slos(tmp_path):
    from benchmarks.report import write_comparison

    with pytest.raises(ValueError, match="different terms"):
        write_comparison({"DvD": searched_document(6.0, 4.5),
                          "coupled": searched_document(4.0, 4.0, tpot_slo_s=0.1)}, tmp_path / "c")


@pytest.fixture(scope="module")
def stack(tiny_checkpoints, tmp_path_factory):
    """`dvd up` on free ports, with the servers' metrics pages."""
    stack = Stack(model=str(tiny_checkpoints["custom"]), gateway_port=free_port(), vision_port=free_port(),
                  language_port=free_port(), feature_port=free_port(), vision_metrics_port=free_port(),
                  language_metrics_port=free_port())
    with Servers({"dvd up": stack.up_command()}, log_dir=tmp_path_factory.mktemp("logs"),
                 stop_timeout_s=60).running(stack.ready()):
        yield stack


@pytest.mark.slow
def test_dvd_bench_run_against_dvd_up_writes_complete_results(stack, tmp_path):
    """The real CLI against a real stack: a two-point concurrency sweep, zero failures, every field present."""
    out = tmp_path / "results" / "run.json"
    bench = subprocess.run(DVD + [
        "bench", "run", "--base-url", stack.gateway_url, "--num-requests", "6", "--output-len", "8",
        "--image-size", "448x448", "--image-size", "896x448", "--concurrency", "1", "--concurrency", "3",
        "--warmup", "1", "--goodput", "e2el:600000", "--no-progress", "--out", str(out),
        "--vision-metrics", f"http://{stack.host}:{stack.vision_metrics_port}/metrics",
        "--language-metrics", f"http://{stack.host}:{stack.language_metrics_port}/metrics"],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["command"].startswith("dvd bench run")
    assert document["target"]["model"] and document["versions"]["openai"] and document["machine"]["cpus"]
    assert [p["max_concurrency"] for p in document["points"]] == [1, 3]
    for point in document["points"]:
        assert (point["completed"], point["failed"], point["failure_reasons"]) == (6, 0, {})
        assert point["total_output_tokens"] == 6 * 8  # ignore_eos: exactly the output length
        assert point["total_input_tokens"] > 6 * 256  # at least one 256-token tile per image
        assert point["request_goodput"] == pytest.approx(point["request_throughput"])
        assert 0 < point["mean_ttft_ms"] <= point["mean_e2el_ms"] and point["mean_tpot_ms"] > 0
        assert point["p50_ttft_ms"] <= point["p90_ttft_ms"] <= point["p99_ttft_ms"]
        stages = point["stages_ms"]
        assert set(stages) == {"preprocess", "vision_queue", "encode", "send", "transfer", "feature_wait", "prefill",
                               "decode"}
        assert stages["encode"] > 0 and stages["prefill"] > 0 and stages["decode"] > 0
        assert 0 <= stages["vision_queue"] < stages["encode"]  # the queue is the first part of "encode"
    with out.with_suffix(".csv").open() as rows:
        table = list(csv.DictReader(rows))
    assert [int(r["completed"]) for r in table] == [6, 6] and "p99_ttft_ms" in table[0]


@pytest.mark.slow
def test_dvd_bench_search_mode_against_dvd_up_judges_every_run_and_records_the_answer(stack, tmp_path):
    """The real CLI's search mode against a real stack, on a tiny budget: structure, not speed. No real request
    meets a 1 ms TTFT SLO, so every run fails and the search walks down from 64 req/s by x8 to its floor
    (start / 64): runs of 6 fresh requests at 64, 8 and 1 req/s, and 0 req/s sustained at p90 and p99."""
    out = tmp_path / "search.json"
    bench = subprocess.run(DVD + [
        "bench", "run", "--base-url", stack.gateway_url, "--search-goodput", "--ttft-slo-ms", "1",
        "--tpot-slo-ms", "600000", "--search-start", "64", "--search-step", "8", "--search-requests", "6",
        "--search-seconds", "0.05", "--image-size", "448x448", "--output-len", "4", "--warmup", "1",
        "--no-progress", "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    document = json.loads(out.read_text())
    found = document["sustained_goodput"]
    assert (found["p90_rps"], found["p99_rps"], found["runs"]) == (0.0, 0.0, 3)
    assert found["settings"]["run_length"] == "max(6 requests, 0.05 s x rate)"
    assert found["settings"]["criterion"]["ttft_slo_s"] == 0.001
    assert [p["request_rate"] for p in document["points"]] == [64.0, 8.0, 1.0]
    for point in document["points"]:
        assert (point["completed"], point["failed"], point["total_output_tokens"]) == (6, 0, 6 * 4)
        for verdict in point["search"]["verdicts"].values():
            assert not verdict["passed"] and not verdict["within_slo"] and verdict["ttft_s"] > 0.001
            assert 0 < verdict["tpot_s"] < 600 and verdict["ttft_growth"] > 0
    assert document["settings"]["goodput_slos_ms"] == {"ttft": 1.0, "tpot": 600000.0}
    with out.with_suffix(".csv").open() as rows:
        table = list(csv.DictReader(rows))
    assert [r["passed_p90"] for r in table] == ["False"] * 3
    assert "sustained goodput: p90 0 req/s, p99 0 req/s (3 runs)" in bench.stdout


@pytest.mark.slow
def test_vllm_bench_serve_runs_against_the_gateway_and_counts_what_dvd_bench_counts(stack, tiny_checkpoints,
                                                                                    tmp_path):
    out = tmp_path / "crosscheck.json"
    check = subprocess.run(DVD + [
        "bench", "crosscheck", "--base-url", stack.gateway_url, "--tokenizer", str(tiny_checkpoints["custom"]),
        "--num-requests", "4", "--output-len", "6", "--image-size", "448x448", "--concurrency", "2",
        "--rounds", "1", "--warmup", "1", "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    medians = json.loads(out.read_text())["medians"]
    for tool in ("vllm bench serve", "dvd bench"):
        assert (medians[tool]["completed"], medians[tool]["failed"]) == (4, 0), tool
        assert medians[tool]["total_output_tokens"] == 4 * 6, tool
    # the same requests to the same server: both tools read the same prompt lengths from the usage
    assert medians["dvd bench"]["total_input_tokens"] == medians["vllm bench serve"]["total_input_tokens"]
    assert out.with_suffix(".md").read_text().startswith("# dvd bench vs vllm bench serve")


# ---------------------------------------------------------------- placement and balancing (`compare --placement`)


def test_cores_split_into_a_language_and_a_vision_share_of_at_least_one_each():
    from benchmarks.toolkit.placement import split_cores

    assert split_cores({1, 0}) == ((0,), (1,))
    assert split_cores(range(8)) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert split_cores([0, 1, 2]) == ((0, 1), (2,))  # half, rounded down, for vision
    assert split_cores([4, 5, 6, 7], vision_cores=1) == ((4, 5, 6), (7,))
    assert split_cores([4, 5, 6, 7], vision_cores=3) == ((4,), (5, 6, 7))
    with pytest.raises(ValueError, match="at least 2 cores"):
        split_cores([3])
    for wrong in (0, 4):
        with pytest.raises(ValueError, match="at least one core to each side"):
            split_cores(range(4), vision_cores=wrong)


def test_pinned_placement_gives_each_server_and_each_coupled_replica_its_cores_and_threads():
    from benchmarks.toolkit.placement import Placement, pin

    pinned = Placement.choose("pinned", vision_cores=1, cores=[0, 1, 2])
    assert pinned.dvd_cores() == {"language-server": (0, 1), "vision-server": (2,)}  # the gateway floats
    assert pinned.coupled_cores() == [(0, 1), (2,)]  # one replica per DvD server's core group
    assert (pinned.dtype, pinned.feature_dtype) == ("bfloat16", "bfloat16")
    assert pin(["python", "-m", "x"], (2, 0)) == ["taskset", "-c", "0,2", "env", "OMP_NUM_THREADS=2",
                                                  "VLLM_CPU_OMP_THREADS_BIND=0,2", "python", "-m", "x"]
    described = pinned.described("coupled", {"coupled-0": [0, 1], "coupled-1": [2]})
    assert described == {"mode": "pinned", "dtype": "bfloat16", "replicas": 2,
                         "balancing": "least outstanding requests", "cores": {"coupled-0": [0, 1], "coupled-1": [2]},
                         "threads": {"coupled-0": 2, "coupled-1": 1}}
    shared = Placement.choose("shared", dtype="float32")
    assert shared.dvd_cores() == {} and shared.coupled_cores() == [None] and shared.feature_dtype == "float32"
    with pytest.raises(ValueError, match="needs --placement pinned"):
        Placement.choose("shared", vision_cores=1)
    with pytest.raises(ValueError, match="shared, pinned"):
        Placement.choose("spread")


def fake_replicas(held: dict[int, asyncio.Event] | None = None):
    """An httpx transport answering as OpenAI-compatible servers on ports 9001, 9002, ...: /v1/models and
    streamed chat completions of 2 tokens; a replica whose port is in `held` answers only once its event is set.
    Returns the transport and the ports of the chat requests in arrival order."""
    import httpx

    arrived: list[int] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return models_reply()
        arrived.append(request.url.port)
        if held and request.url.port in held:
            await asyncio.wait_for(held[request.url.port].wait(), 60)
        return streamed_reply()

    return httpx.MockTransport(handle), arrived


def fake_clients(transport, count: int):
    import httpx
    import openai

    return [openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{9001 + i}/v1", api_key="x", max_retries=0,
                               http_client=httpx.AsyncClient(transport=transport)) for i in range(count)]


def test_balancer_sends_each_request_to_the_replica_with_fewest_in_flight():
    from benchmarks.toolkit.loadgen import Balancer, LoadPoint, run_point

    async def scenario():
        release = asyncio.Event()
        transport, arrived = fake_replicas({9001: release})
        balancer = Balancer(fake_clients(transport, 2))
        # Replica 9001 holds its first request until 9002 has served five: with two requests in flight at
        # most, every later request must go to 9002 (round-robin would send the third to 9001 and stall).
        requests = synthetic(6, [(32, 32)], 0, 2, 2, seed=0)

        async def release_after_five():
            while arrived.count(9002) < 5:
                await asyncio.sleep(0)
            release.set()

        releaser = asyncio.create_task(release_after_five())
        results, _ = await run_point(balancer, "m", requests, LoadPoint(max_concurrency=2), 1.0, 0, True, {},
                                     progress=False)
        await releaser
        assert all(r.success for r in results)
        # One request reached 9001 (held there while 9002 served the other five); which of the first requests
        # reaches its replica first is the event loop's choice, not the balancer's, so arrival order is not checked.
        assert arrived.count(9001) == 1 and arrived.count(9002) == 5 and balancer.sent == [1, 5]
        assert balancer.outstanding == [0, 0]

    async def all_at_once():  # nothing answered yet: in turn, each replica once before any gets a second
        balancer = Balancer(["a", "b", "c"])
        async with contextlib.AsyncExitStack() as held:
            chosen = [await held.enter_async_context(balancer.client()) for _ in range(7)]
            assert chosen == ["a", "b", "c", "a", "b", "c", "a"] and balancer.outstanding == [3, 2, 2]
        assert balancer.outstanding == [0, 0, 0] and balancer.choose() == 1  # ties: after the last chosen

    asyncio.run(scenario())
    asyncio.run(all_at_once())


def test_bench_over_replicas_writes_one_result_with_the_requests_each_replica_got(monkeypatch):
    import functools

    import httpx
    import openai

    from benchmarks.toolkit.loadgen import LoadPoint
    from benchmarks.toolkit.sweep import RunOptions, bench

    transport, arrived = fake_replicas()
    monkeypatch.setattr(openai, "AsyncOpenAI", functools.partial(
        openai.AsyncOpenAI, http_client=httpx.AsyncClient(transport=transport)))
    requests = synthetic(2 + 4, [(32, 32)], 0, 2, 2, seed=0)
    workload = RequestBatches.fresh(requests, warmup=2, points=1, described={"source": "test"})
    urls = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    document = asyncio.run(bench(urls, workload, RunOptions(points=[LoadPoint()], progress=False)))
    [point] = document["points"]
    assert (point["completed"], point["failed"], point["total_output_tokens"]) == (4, 0, 8)
    assert document["target"]["base_urls"] == urls and document["target"]["model"] == "m"
    assert document["target"]["requests_sent"] == [3, 3] and sorted(arrived) == [9001] * 3 + [9002] * 3


def test_comparison_table_says_how_each_system_was_placed(tmp_path):
    from benchmarks.report import write_comparison

    dvd, coupled = result_document([2.0, 6.0]), result_document([1.0, 3.0])
    dvd["placement"] = {"mode": "pinned", "dtype": "bfloat16", "feature_dtype": "bfloat16", "replicas": 1,
                        "cores": {"vision-server": [1], "language-server": [0], "gateway": [0, 1]},
                        "threads": {"vision-server": 1, "language-server": 1}}
    coupled["placement"] = {"mode": "pinned", "dtype": "bfloat16", "replicas": 2,
                            "balancing": "least outstanding requests", "cores": {"coupled-0": [0], "coupled-1": [1]},
                            "threads": {"coupled-0": 1, "coupled-1": 1}}
    coupled["target"]["requests_sent"] = [5, 5]
    text = write_comparison({"DvD": dvd, "coupled": coupled}, tmp_path / "c").read_text()
    assert ("Placement of DvD: placement `pinned`, dtype bfloat16, features bfloat16, 1 replica; vision-server on "
            "cores 1 (1 thread), language-server on cores 0 (1 thread), gateway on cores 0,1") in text
    assert ("Placement of coupled: placement `pinned`, dtype bfloat16, 2 replicas (least outstanding requests), "
            "requests sent to each [5, 5]; coupled-0 on cores 0 (1 thread), coupled-1 on cores 1 (1 thread)") in text
    assert text.index("Placement of") < text.index("| system |")


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinned placement needs at least 2 cores")
def test_compare_pinned_runs_each_server_on_its_cores_and_balances_over_two_coupled_replicas(tiny_checkpoints,
                                                                                           tmp_path):
    """The real CLI: DvD's servers and two coupled `vllm serve` replicas, each pinned; both replicas served."""
    from benchmarks.toolkit.placement import split_cores

    language, vision = split_cores(os.sched_getaffinity(0))
    compare = subprocess.run(DVD + [
        "bench", "compare", "--model", str(tiny_checkpoints["custom"]), "--placement", "pinned", "--name", "pin",
        "--out-dir", str(tmp_path / "results"), "--log-dir", str(tmp_path / "logs"), "--num-requests", "3",
        "--output-len", "4", "--image-size", "448x448", "--warmup", "2", "--no-progress", "--no-search-goodput"],
        capture_output=True, text=True, env=ENV, timeout=1200)
    assert compare.returncode == 0, compare.stdout[-3000:] + compare.stderr[-3000:]
    dvd = json.loads((tmp_path / "results" / "bench_pin.json").read_text())
    coupled = json.loads((tmp_path / "results" / "coupled_pin.json").read_text())
    for document in (dvd, coupled):
        assert (document["points"][0]["completed"], document["points"][0]["failed"]) == (3, 0)
    assert dvd["placement"]["cores"] == {"vision-server": list(vision), "language-server": list(language),
                                         "gateway": sorted(os.sched_getaffinity(0))}
    assert dvd["placement"]["threads"] == {"vision-server": len(vision), "language-server": len(language)}
    assert (dvd["placement"]["dtype"], dvd["placement"]["feature_dtype"]) == ("bfloat16", "bfloat16")
    assert coupled["placement"]["replicas"] == 2 and coupled["placement"]["dtype"] == "bfloat16"
    assert coupled["placement"]["cores"] == {"coupled-0": list(language), "coupled-1": list(vision)}
    sent = coupled["target"]["requests_sent"]
    assert len(sent) == 2 and min(sent) >= 1 and sum(sent) == 2 + 3
    for i in range(2):  # each replica's own access log shows the chat completions it served
        log = (tmp_path / "logs" / "coupled" / f"coupled-{i}.log").read_text(errors="replace")
        assert log.count('"POST /v1/chat/completions HTTP/1.1" 200') == sent[i], f"coupled-{i}"
        assert "dtype=torch.bfloat16" in log
    table = (tmp_path / "results" / "bench_pin_compare.md").read_text()
    assert "Placement of coupled: placement `pinned`, dtype bfloat16, 2 replicas" in table


@pytest.mark.parametrize("tiles", [1, 3, 6, 12])
def test_heatmap_requests_carry_the_tiles_per_request_they_are_named_for(tiles):
    import base64

    from benchmarks.heatmap import requests_for
    from vision_server.preprocess import preprocess_tiles

    (request,) = requests_for({"tiles": tiles, "output_tokens": 16}, 1, seed=0)
    counted = sum(preprocess_tiles(base64.b64decode(url.split(",", 1)[1]), max_tiles=12).shape[0]
                  for url in request.images)
    assert counted == tiles and request.output_len == 16


def search_run(rate: float, passed: tuple[bool, bool], growth: float = 1.0, tpot_s: float = 0.01) -> dict:
    """A search run's row as `bench` writes it, with its verdicts at p90 and p99."""
    def verdict(p: float, ok: bool) -> dict:
        from planner.sustained import Verdict

        sustained = growth < 1.5
        made = Verdict(p, 0.3, tpot_s, growth, sustained, within_slo=ok if sustained else tpot_s <= 0.03)
        assert made.passed == ok
        return dataclasses.asdict(made) | {"passed": made.passed, "reason": made.reason}

    return {"request_rate": rate, "max_concurrency": None, "completed": 200, "failed": 0,
            "request_throughput": rate, "request_goodput": rate, "p90_ttft_ms": 300.0, "p99_ttft_ms": 400.0,
            "p90_tpot_ms": tpot_s * 1e3, "p99_tpot_ms": tpot_s * 1e3, "search": {"run": 0, "verdicts": {
                "p90": verdict(90.0, passed[0]), "p99": verdict(99.0, passed[1])}}}


def heatmap_point(tiles: int, out: int, dvd_p90: float, coupled_p90: float) -> dict:
    def measured(p90: float, cpu: dict) -> dict:
        runs = [search_run(p90, (True, True)), search_run(p90 * 1.1, (False, False), growth=3.0),
                search_run(p90 * 1.2, (False, False), tpot_s=0.05)]
        return {"sustained_p90_rps": p90, "sustained_p99_rps": p90 / 2, "start_rps": 1.6, "runs": runs, "cpu_s": cpu}

    return {"tiles": tiles, "output_tokens": out, "capacity_rps": {"DvD": 2.0, "coupled": 1.5},
            "predicted": {"DvD": {"sustained_p90_rps": 1.5, "sustained_p99_rps": 1.2},
                          "coupled": {"sustained_p90_rps": 1.0, "sustained_p99_rps": 1.0}},
            "measured": {"DvD": measured(dvd_p90, {"vision-server": 3.0, "language-server": 6.0}),
                         "coupled": measured(coupled_p90, {"coupled-0": 5.0, "coupled-1": 5.0})}}


def test_heatmap_reports_sustained_goodput_ratios_what_broke_first_and_tolerates_zero(tmp_path):
    from benchmarks.heatmap import write
    from benchmarks.toolkit.search import GoodputSearch

    points = [heatmap_point(1, 16, 1.3, 1.0), heatmap_point(1, 64, 0.5, 0.0)]
    result = {"name": "t", "slos_ms": {"ttft": 2000.0, "tpot": 30.0}, "tiles": [1], "output_tokens": [16, 64],
              "search": GoodputSearch().described(), "start_share": 0.8, "probe_concurrency": 8, "points": points}
    write(result, tmp_path)
    first, second = json.loads((tmp_path / "heatmap_t.json").read_text())["points"]
    assert first["ratios"] == {"sustained_p90": 1.3, "predicted_sustained_p90": 1.5, "sustained_p99": 1.3,
                               "predicted_sustained_p99": 1.2, "capacity": 1.333, "vision_over_language_cpu": 0.5}
    assert second["ratios"]["sustained_p90"] is None  # coupled sustained nothing: no ratio, not a division error
    table = (tmp_path / "heatmap_t.md").read_text()
    assert "max(200 requests, 60 s x rate)" in table
    assert ("| 1 | 16 | 2.00 / 1.50 | 1.30 / 1.00 | **1.30** (1.50) | 0.65 / 0.50 | 1.30 (1.20) | queue at 1.43 | "
            "queue at 1.1 | 0.50 | 3 / 3 |") in table
    assert "| 1 | 64 | 2.00 / 1.50 | 0.50 / 0.00 | **-** (1.50) |" in table
    assert (tmp_path / "heatmap_t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_refuses_to_repredict_a_single_rate_result(tmp_path):
    import typer

    from benchmarks.heatmap import repredict

    old = tmp_path / "heatmap_old.json"
    old.write_text(json.dumps({"name": "old", "slos_ms": {"ttft": 2000.0, "tpot": 30.0}, "points": []}))
    with pytest.raises(typer.BadParameter, match="single-rate goodput"):
        repredict(old, tmp_path / "profiles.json")


def test_heatmap_repredicts_both_systems_sustained_goodput_with_the_runs_it_measured(tmp_path):
    from benchmarks.heatmap import RESULTS, repredict
    from benchmarks.toolkit.search import GoodputSearch

    search = GoodputSearch(least_requests=50, least_seconds=10.0)
    result = {"name": "r", "slos_ms": {"ttft": 2000.0, "tpot": 30.0}, "tiles": [3], "output_tokens": [16],
              "search": search.described() | {"start": "0.8 x each system's closed-loop capacity"},
              "start_share": 0.8, "probe_concurrency": 8, "points": [heatmap_point(3, 16, 1.3, 1.0)]}
    path = tmp_path / "heatmap_r.json"
    path.write_text(json.dumps(result))
    repredict(path, RESULTS / "profiles" / "cpu_tiny_2026_12.json")
    [point] = json.loads(path.read_text())["points"]
    for system in ("DvD", "coupled"):
        predicted = point["predicted"][system]
        assert 0 < predicted["sustained_p99_rps"] <= predicted["sustained_p90_rps"]
    assert point["ratios"]["predicted_sustained_p90"] == pytest.approx(
        point["predicted"]["DvD"]["sustained_p90_rps"] / point["predicted"]["coupled"]["sustained_p90_rps"], abs=1e-3)


def _api_server_runs(model: str, costs: dict[str, float]) -> list[dict]:
    """benchmarks/mm_processor.py's runs for `model`, each costing exactly what `costs` say."""
    from benchmarks.mm_processor import RUNS, TILES

    rows = []
    for text, images, output, size in RUNS[model]:
        units = {"request_s": 1, "image_s": images, "tile_s": images * TILES[size], "text_token_s": text,
                 "output_token_s": output, "image_text_token_s": images * text}
        rows.append({"text_tokens": text, "images": images, "image_hw": list(size), "output_tokens": output,
                     "api_server_cpu_s_per_request": sum(costs.get(k, 0.0) * n for k, n in units.items())})
    return rows


def test_the_api_server_fit_recovers_each_cost_the_runs_tell_apart():
    from benchmarks.mm_processor import fit

    qwen = {"request_s": 0.004, "image_s": 0.036, "text_token_s": 2e-6, "output_token_s": 1.3e-4,
            "image_text_token_s": 7.5e-6}
    got = fit(_api_server_runs("qwen3-vl", qwen))
    assert {k: got[k] for k in qwen} == pytest.approx(qwen, rel=1e-6)
    assert got["tile_s"] == 0.0 and got["max_relative_residual"] == 0.0  # tiles move with images there
    # InternVL's five runs cannot also tell the image x text term apart: it is left out, the rest is exact
    internvl = {"request_s": 0.01, "image_s": 1e-4, "tile_s": 0.0065, "text_token_s": 2.8e-6, "output_token_s": 2.6e-4}
    got = fit(_api_server_runs("internvl", internvl))
    assert {k: got[k] for k in internvl} == pytest.approx(internvl, rel=1e-6)
    assert got["image_text_token_s"] == 0.0


def test_the_api_server_fit_never_gives_a_negative_cost():
    from benchmarks.mm_processor import fit

    rows = _api_server_runs("qwen3-vl", {"image_s": 0.04, "output_token_s": 1e-4})
    rows[0]["api_server_cpu_s_per_request"] *= 3  # one noisy run, which plain least squares answers below zero
    unconstrained = np.linalg.lstsq(
        np.array([[1.0, r["images"], r["text_tokens"], r["output_tokens"], r["images"] * r["text_tokens"]]
                  for r in rows]), np.array([r["api_server_cpu_s_per_request"] for r in rows]), rcond=None)[0]
    assert unconstrained.min() < 0
    got = fit(rows)
    assert min(got[k] for k in ("request_s", "image_s", "text_token_s", "output_token_s",
                                "image_text_token_s")) >= 0.0
    assert got["max_relative_residual"] > 0


def test_the_tiny_qwen3_vl_checkpoint_processes_a_640px_image_into_400_tokens(tmp_path):
    """benchmarks/qwen3_vl_tiny.py writes Qwen3-VL's published processor settings: 16 px patches merged 2x2."""
    from PIL import Image
    from transformers import AutoProcessor

    from benchmarks.mm_processor import qwen3_vl_checkpoint

    processor = AutoProcessor.from_pretrained(qwen3_vl_checkpoint(tmp_path, sys.executable))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True)
    done = processor(text=[prompt], images=[Image.new("RGB", (640, 640))], return_tensors="pt")
    assert done["image_grid_thw"].tolist() == [[1, 40, 40]]
    assert (done["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum().item() == 400
