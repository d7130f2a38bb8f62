"""The simulator's parts on tiny hand-built scenarios: no service-time spread, so every simulated time is known
exactly and checked to the nanosecond (`planner/simulate.py`)."""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from planner.derive import derive
from planner.engine import Request, SchedulerConfig
from planner.geometry import TiledImages, geometry
from planner.hardware import ACCELERATORS
from planner.profiles import (
    CoupledProfile,
    DecodePoint,
    FrontendCosts,
    LanguageProfile,
    PrefillPoint,
    StageProfiles,
)
from planner.roofline import Efficiency, Roofline, StepShape
from planner.simulate import (
    Client,
    CoupledRun,
    Device,
    DvdRun,
    EpdRun,
    Frontend,
    Host,
    Spread,
    VisionServer,
    _arrivals,
    _coupled_frontend,
    _relay,
    engine_config,
    make_requests,
    pool_loads,
    simulate_coupled,
    simulate_dvd,
    simulate_epd,
    step_cost,
)
from tests.test_planner import profile, workload

# profile(): 100 tiles/s whatever the batch, prefill 0.01 s per 800 tokens, 5 ms decode steps, a 10 GB/s link
# with 0.1 ms latency, 64-wide features (128 bytes a token); max 32 tiles a batch, 5 ms batch wait.
PREFILL_S_PER_TOKEN = 0.01 / 800
DECODE_S = 0.005
BATCH_WAIT_S = 0.005


def wire_s(tokens: int) -> float:
    return 1e-4 + tokens * 128 / 10e9


def one_request(**fields):
    """A closed loop of one client: a request at t=0, one image of three tiles, 32 text tokens, two output tokens."""
    return workload(**({"arrival_rate": None, "concurrency": 1, "requests": 1, "output_tokens": 2} | fields))


def zero_spread() -> Spread:
    return Spread(0.0, seed=0)


# ---------------------------------------------------------------- make_requests


def test_requests_of_a_measured_profile_have_tiles_of_1024_patches_and_256_tokens_each():
    requests = make_requests(workload(images_per_request=2, tiles_per_image=3, text_tokens=32, output_tokens=16,
                                      requests=3, images_first=False), profile())
    assert [r.index for r in requests] == [0, 1, 2]
    for r in requests:
        assert r.sequences == [[1024] * 3, [1024] * 3]
        assert r.image_tokens == [768, 768]
        assert (r.text_tokens, r.output_tokens, r.arrival, r.images_first) == (32, 16, 0.0, False)


def test_vir_sends_its_share_of_tiles_as_64_token_tiles():
    all_small = make_requests(workload(tiles_per_image=3, vir_compressed_share=1.0, requests=2), profile())
    assert [r.image_tokens for r in all_small] == [[192], [192]]
    half = make_requests(workload(tiles_per_image=4, vir_compressed_share=0.5, requests=400), profile())
    counts = [r.image_tokens[0] for r in half]
    compressed = [(4 * 256 - c) / (256 - 64) for c in counts]  # tiles sent small in each image
    assert all(k == int(k) and 0 <= k <= 4 for k in compressed)
    assert np.mean(compressed) == pytest.approx(2.0, rel=0.1)
    assert len(set(counts)) == 5


def test_drawn_shapes_follow_the_workloads_seed():
    load = workload(images_per_request={0: 1, 1: 1, 2: 1}, tiles_per_image={1: 1, 6: 1}, text_tokens={10: 1, 90: 1},
                    output_tokens={2: 1, 50: 1}, vir_compressed_share=0.5, requests=60)

    def shapes(requests):
        return [(r.sequences, r.image_tokens, r.text_tokens, r.output_tokens) for r in requests]

    first = shapes(make_requests(load, profile()))
    assert first == shapes(make_requests(load, profile()))
    assert first != shapes(make_requests(load.model_copy(update={"seed": 1}), profile()))
    assert {len(s) for s, *_ in first} == {0, 1, 2}
    assert {t for *_, t, _ in first} == {10, 90} and {o for *_, o in first} == {2, 50}


def _roofline_profile(model) -> StageProfiles:
    return profile().model_copy(update={"roofline": Roofline(accelerator=ACCELERATORS["h100-sxm"], model=model)})


def test_a_tiled_models_own_tile_size_and_tokens_replace_the_profiles():
    """The roofline's model says how many patches a tile has and how many tokens it makes, not the geometry."""
    model = geometry("8b")
    model = model.model_copy(update={"images": TiledImages(tile_px=230, tokens_per_tile=100,
                                                           compressed_tokens_per_tile=10)})
    profiles = _roofline_profile(model)
    patches = (230 // model.vision.patch_size) ** 2  # whole patches: 16 x 16
    assert patches == 256
    [r] = make_requests(workload(tiles_per_image=3, requests=1), profiles)
    assert r.sequences == [[patches] * 3] and r.image_tokens == [300]
    [small] = make_requests(workload(tiles_per_image=3, requests=1, vir_compressed_share=1.0), profiles)
    assert small.image_tokens == [30]
    # by pixels: the model's tile grid (460x230 at 230 px tiles: two tiles and a thumbnail)
    [by_px] = make_requests(workload(image_px=(460, 230), requests=1), profiles)
    assert by_px.sequences == [[patches] * 3] and by_px.image_tokens == [300]


def test_a_native_resolution_model_takes_tokens_by_pixels_and_needs_image_px():
    profiles = _roofline_profile(geometry("qwen3-vl-4b"))
    [r] = make_requests(workload(image_px=(640, 640), images_per_request=2, requests=1), profiles)
    assert r.sequences == [[1600], [1600]] and r.image_tokens == [400, 400]
    with pytest.raises(ValueError, match="^qwen3-vl-4b takes images at their own resolution: give the workload's "
                                         "image_px$"):
        make_requests(workload(requests=1), profiles)


def test_image_px_needs_a_derived_profile():
    with pytest.raises(ValueError, match=r"^image_px needs a derived profile \(its model geometry turns pixels into "
                                         r"tokens\)$"):
        make_requests(workload(image_px=(448, 448), requests=1), profile())


# ---------------------------------------------------------------- Spread, Device, Host


def test_spread_draws_a_lognormal_of_the_same_mean():
    cv = 0.5
    sigma = np.sqrt(np.log1p(cv * cv))
    reference = np.random.default_rng([7, 2])
    spread = Spread(cv, seed=7)
    assert spread.sigma == pytest.approx(sigma)
    for seconds in (2.0, 0.3):
        assert spread(seconds) == pytest.approx(seconds * reference.lognormal(-sigma ** 2 / 2, sigma), rel=1e-12)
    assert spread(0.0) == 0.0  # draws nothing: the next time gets the next draw
    assert spread(1.0) == pytest.approx(reference.lognormal(-sigma ** 2 / 2, sigma), rel=1e-12)
    assert Spread(0.0, seed=7)(0.25) == 0.25


def _finish_times(device: Device, jobs: list[tuple[str, float, float]]) -> dict[str, float]:
    env, done = device.env, {}

    def job(name, start, seconds):
        yield env.timeout(start)
        yield from device.run(seconds)
        done[name] = env.now

    for name, start, seconds in jobs:
        env.process(job(name, start, seconds))
    env.run()
    return done


def test_a_device_runs_jobs_whole_in_arrival_order():
    device = Device(simpy.Environment(), None, zero_spread())
    assert _finish_times(device, [("a", 0.0, 1.0), ("b", 0.0, 0.5), ("c", 0.2, 0.25)]) == pytest.approx(
        {"a": 1.0, "b": 1.5, "c": 1.75})


def test_a_time_sliced_device_takes_turns_slice_by_slice():
    device = Device(simpy.Environment(), 0.25, zero_spread())
    # a [0, .25], b [.25, .5], a [.5, .75], b [.75, 1] done, a [1, 1.25], [1.25, 1.5] done
    assert _finish_times(device, [("a", 0.0, 1.0), ("b", 0.0, 0.5)]) == pytest.approx({"a": 1.5, "b": 1.0})


def test_an_exclusive_device_keeps_no_turns():
    device = Device(simpy.Environment(), None, zero_spread(), exclusive=True)
    assert _finish_times(device, [("a", 0.0, 1.0), ("b", 0.0, 0.5)]) == pytest.approx({"a": 1.0, "b": 0.5})


def test_a_device_and_a_host_take_their_spread_times():
    env = simpy.Environment()
    device = Device(env, None, Spread(0.4, seed=3))
    expected = Spread(0.4, seed=3)(0.5)
    assert _finish_times(device, [("a", 0.0, 0.5)]) == pytest.approx({"a": expected}, rel=1e-12)
    assert expected != pytest.approx(0.5)

    env = simpy.Environment()
    host = Host(env, profile().model_copy(update={"service_time_cv": 0.4}), workload(seed=5))
    done = []

    def job():
        yield from host.run(0.5)
        yield from host.run(0.5)
        done.append(env.now)

    env.process(job())
    env.run()
    reference = Spread(0.4, seed=6)  # the workload's seed + 1
    assert done == [pytest.approx(reference(0.5) + reference(0.5), rel=1e-12)]


def test_a_host_runs_jobs_side_by_side():
    env = simpy.Environment()
    host = Host(env, profile(), workload())
    done = {}

    def job(name, seconds):
        yield from host.run(seconds)
        done[name] = env.now

    env.process(job("a", 1.0))
    env.process(job("b", 0.5))
    env.run()
    assert done == pytest.approx({"a": 1.0, "b": 0.5})


# ---------------------------------------------------------------- Frontend, Client, _relay


def _request(index=0, text=10, images=(), output=4):
    """A request of `images` (tiles per image, 1024 patches and 256 tokens a tile)."""
    return Request(index, 0.0, [[1024] * t for t in images], [256 * t for t in images], text, output)


def _take_times(costs: FrontendCosts, requests: list[Request], **front) -> tuple[dict[int, float], Frontend]:
    env = simpy.Environment()
    front = Frontend(env, costs, zero_spread(), **front)
    done = {}
    for r in requests:
        front.take(r, lambda r: done.__setitem__(r.index, env.now))
    env.run()
    return done, front


COSTS = FrontendCosts(request_s=0.1, image_s=0.2, tile_s=0.05, text_token_s=0.01)


def test_taking_a_request_with_images_runs_its_text_on_the_multimodal_worker():
    # event loop 0.1; worker: 2 images 0.4, 5 tiles 0.25, 10 text tokens 0.1
    done, front = _take_times(COSTS, [_request(text=10, images=(3, 2))])
    assert done == {0: pytest.approx(0.85)}
    assert front.busy_s == pytest.approx(0.85)


def test_each_image_costs_more_with_a_longer_prompt_where_the_processor_scans_it_per_image():
    costs = FrontendCosts(image_s=0.2, image_text_token_s=0.001)
    # 2 images x (0.2 + 100 text tokens x 0.001), on the multimodal worker
    done, front = _take_times(costs, [_request(text=100, images=(1, 1))])
    assert done == {0: pytest.approx(0.6)} and front.busy_s == pytest.approx(0.6)
    done, front = _take_times(costs, [_request(text=100)])  # no image, no scan
    assert done == {0: 0.0} and front.busy_s == 0.0


def test_taking_a_text_request_runs_its_text_on_the_event_loop():
    done, front = _take_times(COSTS, [_request(text=10)])
    assert done == {0: pytest.approx(0.2)} and front.busy_s == pytest.approx(0.2)
    done, front = _take_times(FrontendCosts(text_token_s=0.01), [_request(text=10)])
    assert done == {0: pytest.approx(0.1)} and front.busy_s == pytest.approx(0.1)
    done, front = _take_times(FrontendCosts(request_s=0.1), [_request(text=10, images=(1,))])
    assert done == {0: pytest.approx(0.1)} and front.busy_s == pytest.approx(0.1)


def test_a_free_front_end_hands_a_request_on_at_once_and_latency_uses_no_core():
    done, front = _take_times(FrontendCosts(), [_request(text=10, images=(2,))])
    assert done == {0: 0.0} and front.busy_s == 0.0
    done, front = _take_times(FrontendCosts(request_s=0.1), [_request(text=10)], latency_s=0.3)
    assert done == {0: pytest.approx(0.4)} and front.busy_s == pytest.approx(0.1)


def test_images_queue_on_the_one_multimodal_worker():
    costs = FrontendCosts(image_s=0.1)
    requests = [_request(0, images=(1,)), _request(1, images=(1,))]
    done, _ = _take_times(costs, requests)
    assert done == pytest.approx({0: 0.1, 1: 0.2})
    # two workers: both images on the process's one core, in 5 ms GIL slices
    done, _ = _take_times(costs, [_request(0, images=(1,)), _request(1, images=(1,))], mm_workers=2)
    assert done == pytest.approx({0: 0.195, 1: 0.2})


def test_a_front_end_runs_on_the_core_it_is_given():
    env = simpy.Environment()
    core = Device(env, None, zero_spread())
    front = Frontend(env, FrontendCosts(request_s=0.1), zero_spread(), core=core)
    done = {}
    front.take(_request(0), lambda r: done.__setitem__("front", env.now))

    def other():
        yield from core.run(0.5)
        done["other"] = env.now

    env.process(other())
    env.run()
    assert done == pytest.approx({"front": 0.1, "other": 0.6})


def _streamer(output_token_s: float):
    env = simpy.Environment()
    front = Frontend(env, FrontendCosts(output_token_s=output_token_s), zero_spread())
    got = []
    return env, front, got, (lambda sampled: got.append((env.now, [(r.index, n) for r, n in sampled])))


def test_streaming_delivers_first_and_last_tokens_and_owes_the_others():
    env, front, got, then = _streamer(0.001)
    a, b = _request(0, output=4), _request(1, output=2)

    def steps():
        front.stream([(a, 1), (b, 1)], then)  # 2 tokens: 2 ms
        yield env.timeout(0.01)
        front.stream([(a, 2), (b, 2)], then)  # b's last; a's second owed: 2 ms
        yield env.timeout(0.01)
        front.stream([(a, 3)], then)  # owed, under a slice: nothing runs
        yield env.timeout(0.01)
        front.stream([(a, 4)], then)  # a's last with the owed one: 2 ms

    env.process(steps())
    env.run()
    assert got == [(pytest.approx(0.002), [(0, 1), (1, 1)]), (pytest.approx(0.012), [(1, 2)]),
                   (pytest.approx(0.032), [(0, 4)])]
    assert front.busy_s == pytest.approx(0.006)


def test_owed_streaming_work_runs_once_a_slice_of_it_has_piled_up():
    env, front, got, then = _streamer(0.0025)
    r = _request(0, output=10)
    front.stream([(r, 2)], then)
    assert front.busy_s == 0.0
    front.stream([(r, 3)], then)  # 5 ms owed: one GIL slice
    env.run()
    assert got == [] and front.busy_s == pytest.approx(0.005) and env.now == pytest.approx(0.005)
    front.stream([(r, 4)], then)
    env.run()
    assert front.busy_s == pytest.approx(0.005)


def test_charged_tokens_are_not_charged_again():
    env, front, got, then = _streamer(0.001)
    r = _request(0, output=3)
    front.charge(2)
    front.stream([(r, 1)], then, charged=True)
    env.run()
    assert got == [(pytest.approx(0.002), [(0, 1)])]


def test_a_free_stream_delivers_at_once():
    env, front, got, then = _streamer(0.0)
    r = _request(0, output=3)
    front.stream([(r, 1)], then)
    assert got == [(0.0, [(0, 1)])]
    front.stream([(r, 2)], then)
    front.stream([(r, 3)], then)
    assert got == [(0.0, [(0, 1)]), (0.0, [(0, 3)])]
    assert env.peek() == float("inf")  # nothing was scheduled


def test_the_client_records_the_first_and_the_last_token_once():
    env = simpy.Environment()
    client = Client(env)
    r = _request(0, output=3)

    def steps():
        yield env.timeout(1.0)
        client.receive([(r, 1)])
        yield env.timeout(1.0)
        client.receive([(r, 2)])
        yield env.timeout(1.0)
        client.receive([(r, 3)])
        yield env.timeout(1.0)
        client.receive([(r, 3)])

    env.process(steps())
    env.run()
    assert (r.first_token, r.finish) == (1.0, 3.0)
    assert client.finished.items == [r]


def test_relay_charges_the_second_front_end_for_every_token_and_delivers_the_first_and_last():
    env = simpy.Environment()
    front = Frontend(env, FrontendCosts(), zero_spread())
    gateways = [Frontend(env, FrontendCosts(output_token_s=0.001), zero_spread()) for _ in range(2)]
    a, b, c = _request(0, output=3), _request(1, output=3), _request(2, output=3)
    a.gateway, b.gateway, c.gateway = gateways[0], gateways[0], gateways[1]
    got = []

    def final(sampled):
        got.append((env.now, sorted((r.index, n) for r, n in sampled)))

    def steps():
        _relay(front, [(a, 1), (b, 1), (c, 1)], "gateway", final)
        yield env.timeout(0.01)
        _relay(front, [(a, 2), (b, 2), (c, 2)], "gateway", final)  # owed
        yield env.timeout(0.01)
        _relay(front, [(a, 3), (c, 3)], "gateway", final)

    env.process(steps())
    env.run()
    assert got == [(pytest.approx(0.001), [(2, 1)]), (pytest.approx(0.002), [(0, 1), (1, 1)]),
                   (pytest.approx(0.022), [(2, 3)]), (pytest.approx(0.023), [(0, 3)])]
    assert [g.busy_s for g in gateways] == pytest.approx([0.005, 0.003])
    assert front.busy_s == 0.0


# ---------------------------------------------------------------- step_cost, engine_config, _coupled_frontend


def _shape(prefills=(), decodes=()):
    shape = StepShape()
    for tokens in prefills:
        shape.add_chunk(tokens, 0, decode=False)
    for context in decodes:
        shape.add_chunk(1, context, decode=True)
    return shape


def _sloped_profile() -> StageProfiles:
    """Decode steps that cost more with the batch and the context; vision faster in bigger batches."""
    p = profile()
    p.language = LanguageProfile(prefill=[PrefillPoint(batch=1, context_tokens=800, seconds=0.01)],
                                 decode=[DecodePoint(batch=1, context_tokens=100, step_seconds=0.01),
                                         DecodePoint(batch=1, context_tokens=1100, step_seconds=0.02),
                                         DecodePoint(batch=2, context_tokens=100, step_seconds=0.012),
                                         DecodePoint(batch=2, context_tokens=1100, step_seconds=0.024)],
                                 max_num_seqs=4)
    p.vision.batch_sweep = [p.vision.batch_sweep[0], p.vision.batch_sweep[0].model_copy(
        update={"batch_tiles": 4, "tiles_per_s": 200.0})]
    return p


def test_a_measured_step_adds_decode_prefill_and_the_encoders_batch():
    cost = step_cost(_sloped_profile())
    # decodes: batch 2 at mean context 600 (between 100 and 1100: 0.018); prefill of 1600 tokens: 0.02;
    # 4 tiles at 200 tiles/s: 0.02
    assert cost(_shape(prefills=[800, 800], decodes=[299, 899]), [1024] * 4) == (pytest.approx(0.058), 0.0)
    assert cost(_shape(decodes=[299, 899]), []) == (pytest.approx(0.018), 0.0)
    assert cost(_shape(prefills=[400]), []) == (pytest.approx(0.005), 0.0)
    assert cost(_shape(), [1024] * 2) == (pytest.approx(2 / (100 + 100 / 3)), 0.0)  # 2 tiles: 133 tiles/s


def test_an_encoder_only_measured_step_costs_its_encoder_alone():
    cost = step_cost(_sloped_profile(), language=False)
    assert cost(_shape(prefills=[800], decodes=[299]), [1024] * 4) == (pytest.approx(0.02), 0.0)
    assert cost(_shape(prefills=[800], decodes=[299]), []) == (0.0, 0.0)


def test_a_measured_coupled_profile_prices_the_encoder_per_tile():
    p = _sloped_profile()
    p.coupled = CoupledProfile(vision_seconds_per_tile=0.03)
    assert step_cost(p)(_shape(prefills=[800]), [1024] * 3) == (pytest.approx(0.01 + 0.09), 0.0)


def _roofline(**update) -> Roofline:
    efficiency = Efficiency(step_host_s=0.003)
    return Roofline(accelerator=ACCELERATORS["h100-sxm"], model=geometry("8b"), efficiency=efficiency,
                    **update)


def test_a_roofline_step_costs_what_the_roofline_says_with_the_host_work_beside_it():
    roofline = _roofline()
    shape, sequences = _shape(prefills=[500], decodes=[700, 900]), [1024, 1024]
    lm, vision = roofline.language_seconds(shape), roofline.vision_seconds(sequences)
    assert lm > 0 and vision > 0
    p = profile().model_copy(update={"roofline": roofline})
    assert step_cost(p)(shape, sequences) == (pytest.approx(lm + vision, rel=1e-12), 0.003)
    assert step_cost(p, language=False)(shape, sequences) == (pytest.approx(vision, rel=1e-12), 0.003)
    # a roofline given replaces the profile's (here the measured tables')
    eager = roofline.model_copy(update={"cuda_graphs": False})
    assert step_cost(profile(), eager)(shape, []) == (pytest.approx(eager.language_seconds(shape), rel=1e-12), 0.003)
    assert eager.language_seconds(shape) != pytest.approx(lm)


def test_engine_config_takes_the_kv_cache_an_engine_of_the_roofline_holds():
    measured = engine_config(profile(), None, vision_weights=True)
    assert measured == SchedulerConfig(max_num_batched_tokens=1 << 30, max_num_seqs=64, enable_chunked_prefill=False,
                                       async_scheduling=False)
    roofline = _roofline()
    with_vision = engine_config(profile(), roofline, vision_weights=True)
    without = engine_config(profile(), roofline, vision_weights=False)
    assert with_vision.kv_cache_tokens == roofline.kv_capacity_tokens(vision_weights=True)
    assert without.kv_cache_tokens == roofline.kv_capacity_tokens(vision_weights=False)
    assert without.kv_cache_tokens > with_vision.kv_cache_tokens
    assert with_vision.model_copy(update={"kv_cache_tokens": None}) == measured
    stated = profile().model_copy(update={"scheduler": SchedulerConfig(kv_cache_tokens=5000)})
    assert engine_config(stated, roofline, vision_weights=True) == SchedulerConfig(kv_cache_tokens=5000)


def test_the_coupled_api_server_comes_from_the_profile_the_coupled_figures_or_the_vision_server():
    api = FrontendCosts(request_s=0.5)
    p = profile(preprocess_s_per_tile=0.004, preprocess_parallelism=3)
    p.language.overhead_s_per_request = 0.002
    assert _coupled_frontend(p) == (FrontendCosts(tile_s=0.004), False, 3, 0.002)
    p.coupled = CoupledProfile(vision_seconds_per_tile=0.1, preprocess_s_per_tile=0.006, preprocess_on_device=True,
                               preprocess_parallelism=2, overhead_s_per_request=0.007)
    assert _coupled_frontend(p) == (FrontendCosts(tile_s=0.006), True, 2, 0.007)
    p.api_server = api
    assert _coupled_frontend(p) == (api, False, 1, 0.0)


# ---------------------------------------------------------------- _arrivals


def test_open_loop_arrivals_are_poisson_at_the_workloads_rate():
    env = simpy.Environment()
    load = workload(arrival_rate=4.0, requests=5, seed=9)
    requests = [_request(i) for i in range(5)]
    started = []
    env.process(_arrivals(env, load, requests, lambda r: started.append((r.index, env.now)), simpy.Store(env)))
    env.run()
    gaps = np.random.default_rng(10).exponential(0.25, size=5)
    assert [i for i, _ in started] == [0, 1, 2, 3, 4]
    assert [t for _, t in started] == pytest.approx(list(np.cumsum(gaps)), rel=1e-12)
    assert [r.arrival for r in requests] == [t for _, t in started]


def test_a_closed_loop_sends_the_next_request_when_one_finishes():
    env = simpy.Environment()
    finished = simpy.Store(env)
    requests = [_request(i) for i in range(4)]
    started = []
    env.process(_arrivals(env, one_request(concurrency=2), requests, lambda r: started.append((r.index, env.now)),
                          finished))

    def finish():
        for at in (1.0, 2.5):
            yield env.timeout(at - env.now)
            finished.put(None)

    env.process(finish())
    env.run()
    assert started == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 2.5)]
    assert [r.arrival for r in requests] == [0.0, 0.0, 1.0, 2.5]


def test_a_closed_loop_of_more_clients_than_requests_sends_them_all_at_once():
    env = simpy.Environment()
    started = []
    env.process(_arrivals(env, one_request(concurrency=5), [_request(0), _request(1)], started.append,
                          simpy.Store(env)))
    env.run()
    assert [r.index for r in started] == [0, 1]


# ---------------------------------------------------------------- coupled serving


def test_one_coupled_request_waits_for_its_api_server_then_encodes_in_the_prefill_step():
    p = profile(preprocess_s_per_tile=0.01)
    p.language.overhead_s_per_request = 0.002
    result = simulate_coupled(p, one_request(), 1)
    [r] = result.requests
    # 2 ms outside the API server's core, 3 tiles of 10 ms on its worker, then one step: 802 tokens' prefill and
    # the encoder's 3 tiles at 100 tiles/s; then a 5 ms decode step
    first = 0.002 + 0.03 + 802 * PREFILL_S_PER_TOKEN + 0.03
    assert (r.first_token, r.finish) == (pytest.approx(first), pytest.approx(first + DECODE_S))
    assert (result.system, result.vision_servers, result.language_servers) == ("coupled", 0, 1)
    assert result.busy_s == {"language": pytest.approx(802 * PREFILL_S_PER_TOKEN + 0.03 + DECODE_S),
                             "api_server": pytest.approx(0.03)}
    assert result.servers == {"language": 1, "api_server": 1}


def test_a_coupled_api_server_on_the_engines_device_takes_turns_with_it():
    p = profile(preprocess_s_per_tile=0.01)
    p.coupled = CoupledProfile(vision_seconds_per_tile=0.02, preprocess_s_per_tile=0.01, preprocess_on_device=True)
    load = one_request(concurrency=2, requests=2)
    a, b = simulate_coupled(p, load, 1).requests
    prefill = 802 * PREFILL_S_PER_TOKEN + 3 * 0.02
    # one API server, one worker: image a 0-30 ms; a's prefill step takes the device first (70 ms), then image b
    # (30 ms), a's decode step (5 ms), b's prefill step
    assert (a.first_token, b.first_token) == (pytest.approx(0.03 + prefill),
                                              pytest.approx(0.03 + prefill + 0.03 + DECODE_S + prefill))
    off = p.model_copy(update={"coupled": p.coupled.model_copy(update={"preprocess_on_device": False})})
    a, b = simulate_coupled(off, load, 1).requests
    # its own core: image b 30-60 ms beside a's prefill; b's prefill joins a's decode step
    assert (a.first_token, b.first_token) == (pytest.approx(0.03 + prefill),
                                              pytest.approx(0.03 + prefill + DECODE_S + prefill))


def test_separate_replicas_take_the_request_with_fewest_outstanding():
    load = one_request(concurrency=3, requests=3)
    run = CoupledRun(profile(), load, 2, None)
    assert run.api_servers is None and len(run.fronts) == 2
    requests = run.requests
    run.start(requests[0])
    run.start(requests[1])
    run.start(requests[2])
    assert [r.frontend for r in requests] == [run.fronts[0], run.fronts[1], run.fronts[0]]
    assert [e.outstanding for e in run.engines] == [2, 1]
    assert [f.outstanding for f in run.fronts] == [2, 1]
    run.env.run()
    assert [e.outstanding for e in run.engines] == [0, 0]
    assert [f.outstanding for f in run.fronts] == [0, 0]
    assert all(r.finish is not None for r in requests)


def test_shared_api_servers_take_connections_in_turn_and_vllms_balancer_rotates_its_scan():
    load = one_request(concurrency=3, requests=5)
    run = CoupledRun(profile(), load, 3, 2)
    assert run.api_servers == 2 and len(run.fronts) == 2
    for r in run.requests[:3]:
        run.start(r)
    assert [r.frontend for r in run.requests[:3]] == [run.fronts[0], run.fronts[1], run.fronts[0]]
    assert [f.outstanding for f in run.fronts] == [2, 1]
    # all three engines idle: the scan starts one further each time, so ties go round robin from engine 1
    for r in run.requests:
        run.to_engine(r)
    # scans from engines 1, 2, 0 (all idle, then all one each), 1, 2: the fifth finds engine 2 least loaded
    assert [[r.index for r in e.waiting] for e in run.engines] == [[2], [0, 3], [1, 4]]
    assert [e.outstanding for e in run.engines] == [1, 2, 2]
    assert run.scan_start == 2


def test_vllms_balancer_picks_the_engine_of_lowest_load_score():
    run = CoupledRun(profile(), one_request(concurrency=3, requests=3), 3, 1)
    run.engines[1].waiting.append(_request(9))
    run.engines[2].waiting.append(_request(8))
    run.to_engine(run.requests[0])
    assert [len(e.waiting) for e in run.engines] == [1, 1, 1]


def test_a_derived_profile_states_how_many_api_servers_share_the_engines():
    p = profile().model_copy(update={"api_server": FrontendCosts(processes=2)})
    run = CoupledRun(p, one_request(), 3, None)
    assert (run.api_servers, len(run.fronts)) == (2, 2)
    p = profile().model_copy(update={"api_server": FrontendCosts()})
    run = CoupledRun(p, one_request(), 3, None)
    assert (run.api_servers, len(run.fronts)) == (3, 3)
    assert CoupledRun(p, one_request(), 3, 1).api_servers == 1
    result = run.run()
    assert result.servers == {"language": 3, "api_server": 3}


def _too_long(roofline, vision_weights):
    """The refusal of a request longer than the KV cache an engine of `roofline` holds."""
    tokens = roofline.kv_capacity_tokens(vision_weights=vision_weights)
    return f"^a request of {10 ** 7 + 16} tokens does not fit the KV cache's {tokens} tokens$"


def test_a_coupled_engine_holds_the_kv_cache_left_beside_the_vision_weights():
    roofline = _roofline()
    p = profile().model_copy(update={"roofline": roofline, "scheduler": SchedulerConfig()})
    load = one_request(images_per_request=0, text_tokens=10 ** 7, output_tokens=16)
    with pytest.raises(ValueError, match=_too_long(roofline, vision_weights=True)):
        simulate_coupled(p, load, 1)


def test_a_dvd_language_server_holds_the_kv_cache_left_without_the_vision_weights():
    roofline = _roofline()
    p = profile().model_copy(update={"roofline": roofline, "scheduler": SchedulerConfig()})
    load = one_request(images_per_request=0, text_tokens=10 ** 7, output_tokens=16)
    with pytest.raises(ValueError, match=_too_long(roofline, vision_weights=False)):
        simulate_dvd(p, load, 1, 1)


# ---------------------------------------------------------------- the vision server


def _vision(max_batch_tiles=32, max_batch_wait_s=0.005, roofline=None):
    env = simpy.Environment()
    p = profile(max_batch_tiles=max_batch_tiles, max_batch_wait_s=max_batch_wait_s)
    done = []
    server = VisionServer(env, p, lambda r, image: done.append((r.index, image, env.now)),
                          Device(env, None, zero_spread()), roofline)
    return env, server, done


def _submit_apart(env, server, first, second, delay_s: float) -> None:
    """`first`'s image to the vision server now, `second`'s `delay_s` later; run until both are encoded."""
    def submit():
        server.submit(first, 0)
        yield env.timeout(delay_s)
        server.submit(second, 0)

    env.process(submit())
    env.run()


def test_a_batch_that_does_not_fill_waits_for_its_oldest_sequence():
    env, server, done = _vision()
    _submit_apart(env, server, _request(0, images=(2,)), _request(1, images=(1,)), 0.003)
    # one batch of three tiles (a, b, a) leaves at 5 ms: 30 ms
    assert done == [(1, 0, pytest.approx(0.035)), (0, 0, pytest.approx(0.035))]
    assert server.busy_s == pytest.approx(0.03)


def test_a_full_batch_leaves_at_once_one_sequence_per_image_per_round():
    env, server, done = _vision(max_batch_tiles=2)
    a, b = _request(0, images=(3,)), _request(1, images=(1,))
    server.submit(a, 0)
    server.submit(b, 0)
    assert server.waiting_tiles == 4
    env.run()
    # [a, b] at 0 -> 20 ms (b done); [a, a] -> 40 ms
    assert done == [(1, 0, pytest.approx(0.02)), (0, 0, pytest.approx(0.04))]


def test_a_batch_takes_at_most_its_budget_of_sequences():
    env, server, done = _vision(max_batch_tiles=3)
    a, b = _request(0, images=(1,)), _request(1, images=(3,))
    server.submit(a, 0)
    server.submit(b, 0)
    env.run()
    # [a, b, b] -> 30 ms (a done); b's last alone, after the wait (already past): 40 ms
    assert done == [(0, 0, pytest.approx(0.03)), (1, 0, pytest.approx(0.04))]
    assert server.busy_s == pytest.approx(0.04)


def test_a_vision_server_waits_again_for_the_next_image():
    env, server, done = _vision()
    _submit_apart(env, server, _request(0, images=(1,)), _request(1, images=(1,)), 1.0)
    assert done == [(0, 0, pytest.approx(0.015)), (1, 0, pytest.approx(1.015))]


def test_a_vision_server_with_a_roofline_prices_its_batch_by_the_roofline():
    roofline = _roofline()
    env, server, done = _vision(max_batch_wait_s=0.0, roofline=roofline)
    server.submit(_request(0, images=(2,)), 0)
    env.run()
    assert done == [(0, 0, pytest.approx(roofline.vision_seconds([1024, 1024]), rel=1e-12))]


# ---------------------------------------------------------------- DvD


def _dvd_first_token(tiles=3, text=32, wait=BATCH_WAIT_S):
    """One request alone on an idle DvD: the batch wait, the encode, the features' transfer, the prefill."""
    return wait + tiles / 100 + wire_s(256 * tiles) + (text + 256 * tiles + 2) * PREFILL_S_PER_TOKEN


def test_one_dvd_request_encodes_crosses_the_link_and_is_prefilled():
    result = simulate_dvd(profile(), one_request(output_tokens=3), 1, 1)
    [r] = result.requests
    assert (r.first_token, r.finish) == (pytest.approx(_dvd_first_token()),
                                         pytest.approx(_dvd_first_token() + 2 * DECODE_S))
    assert (result.system, result.vision_servers, result.language_servers) == ("dvd", 1, 1)
    assert result.busy_s == {"vision": pytest.approx(0.03),
                             "language": pytest.approx(802 * PREFILL_S_PER_TOKEN + 2 * DECODE_S),
                             "wire": pytest.approx(wire_s(768)), "language_frontend": 0.0}
    assert result.servers == {"vision": 1, "language": 1, "wire": 1, "language_frontend": 1}


def test_a_text_only_dvd_request_goes_straight_to_its_language_server():
    [r] = simulate_dvd(profile(), one_request(images_per_request=0), 1, 1).requests
    assert r.first_token == pytest.approx(32 * PREFILL_S_PER_TOKEN)  # no image markers


def test_the_vision_servers_overheads_and_preprocessing_come_before_the_batch():
    p = profile(overhead_s_per_request=0.004, preprocess_s_per_tile=0.002, max_batch_wait_s=0.0)
    [r] = simulate_dvd(p, one_request(), 1, 1).requests
    assert r.first_token == pytest.approx(0.004 + 0.006 + _dvd_first_token(wait=0.0))


def test_preprocessing_on_the_vision_device_takes_turns_with_the_encoder():
    """Two images at once: on host threads both are preprocessed side by side; on the device, one after the other,
    and the first is encoded before the second is processed."""
    p = profile(preprocess_s_per_tile=0.01, preprocess_parallelism=2, max_batch_wait_s=0.0)
    load = one_request(images_per_request=2, tiles_per_image=1)
    [r] = simulate_dvd(p, load, 1, 1).requests
    # both at 10 ms, one batch of two: 30 ms; two transfers on one link; prefill of 32 + 2 * 258 tokens
    prefill = (32 + 2 * 258) * PREFILL_S_PER_TOKEN
    assert r.first_token == pytest.approx(0.01 + 0.02 + 2 * wire_s(256) + prefill)
    on_device = p.model_copy(update={"vision": p.vision.model_copy(update={"preprocess_on_device": True})})
    [r] = simulate_dvd(on_device, load, 1, 1).requests
    # device: image 0 10 ms, image 1 10 ms (the encoder's batch of image 0 waits its turn), 10 ms encode,
    # then image 1's 10 ms encode
    assert r.first_token == pytest.approx(0.04 + wire_s(256) + prefill)


def test_one_preprocessing_thread_takes_a_requests_images_in_turn():
    p = profile(preprocess_s_per_tile=0.01, max_batch_wait_s=0.0)
    [r] = simulate_dvd(p, one_request(images_per_request=2, tiles_per_image=1), 1, 1).requests
    # image 0: 10 ms, encoded 10-20 ms; image 1: 20 ms, encoded 20-30 ms
    assert r.first_token == pytest.approx(0.03 + wire_s(256) + (32 + 2 * 258) * PREFILL_S_PER_TOKEN)


def test_a_language_front_end_and_gateways_add_their_work():
    p = profile()
    p.gateway = FrontendCosts(request_s=0.01, output_token_s=0.001)
    p.language_frontend = FrontendCosts(request_s=0.02)
    result = simulate_dvd(p, one_request(output_tokens=3), 1, 1)
    [r] = result.requests
    # gateway 10 ms; the language front end's 20 ms runs during the 5 ms wait and 30 ms encode
    first = 0.01 + _dvd_first_token() + 0.001
    assert r.first_token == pytest.approx(first)
    assert r.finish == pytest.approx(first - 0.001 + 2 * DECODE_S + 0.002)  # the second token's work owed
    assert result.busy_s["gateway"] == pytest.approx(0.013)
    assert result.busy_s["language_frontend"] == pytest.approx(0.02)
    assert result.servers["gateway"] == 1


def test_a_language_front_ends_latency_when_the_profile_has_none():
    p = profile()
    p.language.overhead_s_per_request = 0.1
    [r] = simulate_dvd(p, one_request(), 1, 1).requests
    # the Generate call arrives at 100 ms, after the features (at 35.1 ms)
    assert r.first_token == pytest.approx(0.1 + 802 * PREFILL_S_PER_TOKEN)
    p.language_frontend = FrontendCosts()
    [r] = simulate_dvd(p, one_request(), 1, 1).requests
    assert r.first_token == pytest.approx(_dvd_first_token())


def test_gateways_take_requests_in_turn_one_per_language_server_by_default():
    p = profile()
    p.gateway = FrontendCosts(request_s=0.01)
    run = DvdRun(p, one_request(concurrency=4, requests=4), 1, [0, 1, 2], False, False)
    assert len(run.gateways) == 2
    result = run.run()
    assert [r.gateway for r in run.requests] == [run.gateways[0], run.gateways[1]] * 2
    assert result.servers["gateway"] == 2 and result.busy_s["gateway"] == pytest.approx(0.04)
    p.gateway = FrontendCosts(request_s=0.01, processes=3)
    assert len(DvdRun(p, one_request(), 1, [0, 1, 2], False, False).gateways) == 3


def test_dispatch_balances_language_and_vision_servers_on_requests_in_flight():
    run = DvdRun(profile(), one_request(concurrency=3, requests=3), 2, [0, 1, 2, 3], False, False)
    for r in run.requests:
        run.start(r)
    assert [run.route[i] for i in range(3)] == [run.languages[0], run.languages[1], run.languages[0]]
    assert [run.vision_route[i] for i in range(3)] == [run.visions[0], run.visions[1], run.visions[0]]
    assert [r.frontend for r in run.requests] == [run.fronts[id(run.route[i])] for i in range(3)]
    assert [v.outstanding for v in run.visions] == [2, 1] and [e.outstanding for e in run.languages] == [2, 1]
    run.env.run()
    assert [v.outstanding for v in run.visions] == [0, 0] and [e.outstanding for e in run.languages] == [0, 0]
    assert all(r.finish is not None for r in run.requests)


def test_a_vision_server_counts_a_request_in_flight_until_its_last_image_is_encoded():
    p = profile(max_batch_tiles=1, max_batch_wait_s=0.0)
    run = DvdRun(p, one_request(images_per_request=2, tiles_per_image=1), 2, [0, 1, 2], False, False)
    [r] = run.requests
    run.start(r)
    server = run.vision_route[0]
    run.env.run(until=0.015)  # the first image done at 10 ms
    assert r.images_encoded == 1 and server.outstanding == 1
    run.env.run(until=0.025)
    assert r.images_encoded == 2 and server.outstanding == 0


def test_spreading_images_sends_each_to_the_least_busy_vision_server():
    p = profile(max_batch_wait_s=0.0)
    load = one_request(images_per_request=2, tiles_per_image=3)
    run = DvdRun(p, load, 2, [0, 1, 2], True, False)
    [r] = run.requests
    run.start(r)
    assert run.vision_route == {(0, 0): run.visions[0], (0, 1): run.visions[1]}
    assert [v.outstanding for v in run.visions] == [1, 1]
    run.env.run()
    assert [v.outstanding for v in run.visions] == [0, 0]
    # both encoded side by side in 30 ms; the second image's features wait for the first's on the one link
    prefill = (32 + 2 * 770) * PREFILL_S_PER_TOKEN
    assert r.first_token == pytest.approx(0.03 + 2 * wire_s(768) + prefill)
    assert run.wire_busy_s == pytest.approx(2 * wire_s(768))
    # whole: one server; its one preprocessing thread hands image 1 on after the batch of image 0 has left
    [whole] = simulate_dvd(p, load, 2, 1).requests
    assert whole.first_token == pytest.approx(0.06 + wire_s(768) + prefill)


def test_each_language_server_receives_features_over_a_link_of_its_own():
    p = profile(max_batch_wait_s=0.0, max_batch_tiles=1)
    p.transport = p.transport.model_copy(update={"latency_s": 0.05})
    load = one_request(concurrency=2, requests=2, tiles_per_image=1)
    # one vision server encodes both (10 ms each); two language servers: transfers side by side, or queued on one
    two = simulate_dvd(p, load, 1, 2).requests
    prefill = 290 * PREFILL_S_PER_TOKEN
    assert [r.first_token for r in two] == pytest.approx([0.01 + wire_s(256) + 0.05 - 1e-4 + prefill,
                                                          0.02 + wire_s(256) + 0.05 - 1e-4 + prefill])


def test_servers_placed_on_one_device_share_it_and_devices_must_match_the_split():
    p = profile(max_batch_wait_s=0.0)
    p.language = LanguageProfile(prefill=[PrefillPoint(batch=1, context_tokens=800, seconds=0.5)],
                                 decode=[DecodePoint(batch=1, context_tokens=800, step_seconds=0.005)])
    load = one_request(concurrency=2, requests=2, tiles_per_image=1, text_tokens=542)
    # encodes 0-10 ms and 10-20 ms; request 0's prefill (0.5 s) from its features' arrival, or on a shared device
    # after the second encode; request 1's prefill (0.5 s) joins request 0's decode step (5 ms)
    apart = simulate_dvd(p, load, 1, 1).requests
    together = simulate_dvd(p, load, 1, 1, devices=[0, 0]).requests
    assert apart[1].first_token == pytest.approx(0.01 + wire_s(256) + 0.5 + 0.505)
    assert together[1].first_token == pytest.approx(0.02 + 0.5 + 0.505)
    with pytest.raises(ValueError, match=r"^devices names 3 servers' devices, the split has 2 servers$"):
        simulate_dvd(p, load, 1, 1, devices=[0, 1, 2])


def test_prefill_as_features_arrive_starts_on_the_text_and_admits_on_the_generate_call():
    p = profile(max_batch_wait_s=0.0)
    load = one_request(tiles_per_image=1, text_tokens=200, images_first=False)
    [waiting] = simulate_dvd(p, load, 1, 1).requests
    [early] = simulate_dvd(p, load, 1, 1, prefill_as_features_arrive=True).requests
    assert waiting.first_token == pytest.approx(0.01 + wire_s(256) + 458 * PREFILL_S_PER_TOKEN)
    # the text and the image's opening marker prefilled (2.5 ms) while the image is encoded and sent (10.1 ms)
    assert early.first_token == pytest.approx(0.01 + wire_s(256) + 257 * PREFILL_S_PER_TOKEN)
    # features in before the Generate call: the prefill waits for nothing
    p.language.overhead_s_per_request = 0.1
    [late] = simulate_dvd(p, load, 1, 1, prefill_as_features_arrive=True).requests
    assert late.first_token == pytest.approx(0.1 + 458 * PREFILL_S_PER_TOKEN)
    [text] = simulate_dvd(p, one_request(images_per_request=0), 1, 1, prefill_as_features_arrive=True).requests
    assert text.first_token == pytest.approx(0.1 + 32 * PREFILL_S_PER_TOKEN)


def test_prefill_as_features_arrive_with_images_first_waits_for_the_first_image():
    p = profile(max_batch_wait_s=0.0)
    load = one_request(tiles_per_image=1, text_tokens=1000, images_first=True)
    [early] = simulate_dvd(p, load, 1, 1, prefill_as_features_arrive=True).requests
    # the opening marker alone before the image, then the rest once the features are in
    assert early.first_token == pytest.approx(0.01 + wire_s(256) + 1257 * PREFILL_S_PER_TOKEN)


# ---------------------------------------------------------------- vLLM's encoder disaggregation


def _derived(tensor_parallel=2):
    api = FrontendCosts(request_s=0.003, image_s=0.004, tile_s=0.001, text_token_s=1e-5)
    return derive("8b", profile(), device="test", peak_tflops=989, hbm_gb_s=3350, tensor_parallel=tensor_parallel,
                  efficiency=Efficiency(step_host_s=0.0), api_server=api)


def test_epd_needs_a_derived_profile():
    with pytest.raises(ValueError, match=r"^simulate_epd needs a derived profile \(roofline and API server costs\)$"):
        simulate_epd(profile(), one_request(), 1, 1, FrontendCosts(), SchedulerConfig())
    p = _derived()
    with pytest.raises(ValueError, match="^simulate_epd needs a derived profile"):
        simulate_epd(p.model_copy(update={"api_server": None}), one_request(), 1, 1, FrontendCosts(),
                     SchedulerConfig())


def _epd_prefill(roofline, prompt):
    shape = StepShape()
    shape.add_chunk(prompt, 0, decode=False)
    return roofline.language_seconds(shape)


def _epd_decode(roofline, before):
    shape = StepShape()
    shape.add_chunk(1, before, decode=True)
    return roofline.language_seconds(shape)


@pytest.mark.parametrize("eager", [False, True])
def test_one_epd_request_goes_proxy_encoder_link_language_server(eager):
    p = _derived()
    proxy = FrontendCosts(request_s=0.002, output_token_s=0.0)
    result = simulate_epd(p, one_request(output_tokens=2), 1, 1, proxy, SchedulerConfig(), language_eager=eager)
    [r] = result.requests
    tokens = 3 * 256
    vision = p.roofline.model_copy(update={"tensor_parallel": 1})
    language = p.roofline.model_copy(update={"cuda_graphs": not eager})
    encoder_api = 0.003 + 0.004 + 3 * 0.001 + 10 * 1e-5  # the encode request: one image, 10 text tokens
    language_api = 0.003 + 0.004 + 3 * 0.001 + 32 * 1e-5
    prompt = 32 + tokens + 2
    first = (0.002 + encoder_api + vision.vision_seconds([1024] * 3) + p.transport.seconds(p.feature_bytes(tokens))
             + language_api + _epd_prefill(language, prompt))
    assert r.first_token == pytest.approx(first, rel=1e-9)
    assert r.finish == pytest.approx(first + _epd_decode(language, prompt + 1), rel=1e-9)
    assert (result.system, result.vision_servers, result.language_servers) == ("epd", 1, 1)
    assert result.busy_s == pytest.approx({
        "vision": vision.vision_seconds([1024] * 3),
        "language": _epd_prefill(language, prompt) + _epd_decode(language, prompt + 1),
        "wire": p.transport.seconds(p.feature_bytes(tokens)), "proxy": 0.002,
        "encoder_api_server": encoder_api, "language_api_server": language_api}, rel=1e-9)
    assert result.servers == {"vision": 1, "language": 1, "wire": 1, "proxy": 1, "encoder_api_server": 1,
                              "language_api_server": 1}


def test_the_epd_proxy_fans_images_out_round_robin_and_waits_for_all():
    p = _derived()
    load = one_request(images_per_request=3, tiles_per_image=1, output_tokens=1)
    run = EpdRun(p, load, 2, 1, FrontendCosts(), SchedulerConfig(), False, None, 10)
    [r] = run.requests
    r.gateway = run.proxy
    run.to_encoder(r)
    assert [f.outstanding for f in run.e_fronts] == [2, 1]
    assert run.pending == {0: [r, 3]}
    run.env.run()
    assert [f.outstanding for f in run.e_fronts] == [0, 0] and run.pending == {}
    api = 0.003 + 0.004 + 0.001 + 10e-5
    vision = p.roofline.model_copy(update={"tensor_parallel": 1})
    # encoder 0 takes images 0 and 2: its API server runs them one after the other on its worker
    encoded = 2 * api + vision.vision_seconds([1024])
    wire = 3 * p.transport.seconds(p.feature_bytes(256))
    language_api = 0.003 + 3 * 0.004 + 3 * 0.001 + 32e-5
    assert r.first_token == pytest.approx(encoded + wire + language_api + _epd_prefill(p.roofline, 32 + 3 * 258),
                                          rel=1e-9)
    assert run.wire_busy_s == pytest.approx(wire)
    assert [e.steps for e in run.e_engines] == [2, 1]


def test_epd_balances_language_servers_and_sends_text_straight_on():
    p = _derived()
    run = EpdRun(p, one_request(images_per_request=0, concurrency=3, requests=3), 1, 2, FrontendCosts(),
                 SchedulerConfig(), False, None, 10)
    for r in run.requests:
        run.start(r)
    run.env.run(until=1e-9)
    assert [r.frontend for r in run.requests] == [run.pd_fronts[0], run.pd_fronts[1], run.pd_fronts[0]]
    assert [r.gateway for r in run.requests] == [run.proxy] * 3
    run.env.run()
    assert [e.outstanding for e in run.pd_engines] == [0, 0]
    assert all(r.finish is not None for r in run.requests) and run.wire_busy_s == 0.0


def test_epd_prefill_decode_instances_take_the_language_scheduler_and_the_kv_cache_without_vision_weights():
    p = _derived().model_copy(update={"api_server": FrontendCosts()})
    load = one_request(images_per_request=0, concurrency=2, requests=2, text_tokens=100, output_tokens=3)
    one_at_a_time = simulate_epd(p, load, 1, 1, FrontendCosts(), SchedulerConfig(), language_scheduler=SchedulerConfig(
        max_num_seqs=1)).requests
    batched = simulate_epd(p, load, 1, 1, FrontendCosts(), SchedulerConfig(max_num_seqs=1)).requests
    assert one_at_a_time[1].first_token > one_at_a_time[0].finish  # the second waits for the first's last token
    assert batched[1].first_token == batched[0].first_token  # the profile's scheduler: both prefilled in one step
    huge = one_request(images_per_request=0, text_tokens=10 ** 7, output_tokens=16)
    with pytest.raises(ValueError, match=_too_long(p.roofline, vision_weights=False)):
        simulate_epd(p, huge, 1, 1, FrontendCosts(), SchedulerConfig())


def test_epd_encoders_take_the_encoder_scheduler():
    """Free API servers: both images' encode requests reach the one encoder at once; it encodes them in one step,
    or one per step with one sequence at a time."""
    p = _derived().model_copy(update={"api_server": FrontendCosts()})
    load = one_request(images_per_request=2, tiles_per_image=1, output_tokens=1)
    vision = p.roofline.model_copy(update={"tensor_parallel": 1})
    rest = 2 * p.transport.seconds(p.feature_bytes(256)) + _epd_prefill(p.roofline, 32 + 2 * 258)
    [together] = simulate_epd(p, load, 1, 1, FrontendCosts(), SchedulerConfig()).requests
    [apart] = simulate_epd(p, load, 1, 1, FrontendCosts(), SchedulerConfig(max_num_seqs=1)).requests
    assert together.first_token == pytest.approx(vision.vision_seconds([1024, 1024]) + rest, rel=1e-9)
    assert apart.first_token == pytest.approx(2 * vision.vision_seconds([1024]) + rest, rel=1e-9)
    assert vision.vision_seconds([1024, 1024]) != pytest.approx(2 * vision.vision_seconds([1024]))


# ---------------------------------------------------------------- pool_loads


def test_pool_loads_are_demand_over_best_case_capacity():
    p = _sloped_profile()
    p.vision.max_batch_tiles = 4  # 200 tiles/s in full batches
    load = workload(images_per_request={1: 1, 2: 1}, tiles_per_image=2, text_tokens=100, output_tokens=32,
                    vir_compressed_share=0.25)
    loads = pool_loads(p, load, 10.0, 2, 4)
    tiles, image_tokens = 3.0, 3 * (0.25 * 64 + 0.75 * 256)  # 624 tokens
    prompt = 100 + image_tokens  # 724
    language_s = (724 * PREFILL_S_PER_TOKEN  # prefill of 4 x 724 tokens, per request
                  + 32 * p.language.decode_step_seconds(4, prompt + 16) / 4)
    assert p.language.decode_step_seconds(4, prompt + 16) == pytest.approx(0.01968 + 2 * (0.01968 - 0.0164))
    assert loads == pytest.approx({"vision": 10 * tiles / 200 / 2, "wire": 10 * wire_s(624) / 4,
                                   "language": 10 * language_s / 4}, rel=1e-12)
    assert list(loads) == ["vision", "wire", "language"]


def test_pool_loads_without_images_or_vision_servers():
    loads = pool_loads(profile(), workload(images_per_request=0, text_tokens=800, output_tokens=10), 2.0, 0, 1)
    assert loads == pytest.approx({"vision": 0.0, "wire": 0.0,
                                   "language": 2.0 * (800 * PREFILL_S_PER_TOKEN + 10 * DECODE_S / 64)}, rel=1e-12)
    loads = pool_loads(profile(), workload(tiles_per_image=1), 2.0, 0, 1)
    assert loads["vision"] == pytest.approx(2.0 * 0.01)


def test_epd_closed_loop_sends_the_next_request_when_one_ends_and_sums_the_wire():
    p = _derived()
    result = simulate_epd(p, one_request(requests=2, output_tokens=2), 1, 1, FrontendCosts(), SchedulerConfig())
    first, second = result.requests
    assert second.arrival == first.finish
    assert second.first_token - second.arrival == pytest.approx(first.first_token - first.arrival, rel=1e-9)
    assert result.busy_s["wire"] == pytest.approx(2 * p.transport.seconds(p.feature_bytes(768)), rel=1e-12)


@pytest.mark.parametrize("api_servers", [None, 1])
def test_a_coupled_api_servers_workers_share_its_core_and_its_latency_uses_none(api_servers):
    p = profile(preprocess_s_per_tile=0.01, preprocess_parallelism=2)
    p.language.overhead_s_per_request = 0.002
    a, b = simulate_coupled(p, one_request(concurrency=2, requests=2), 1, api_servers).requests
    # both in the API server from 2 ms; two workers on its core in 5 ms slices: a's 30 ms done at 57 ms, b's at
    # 62 ms; a's prefill step (40.025 ms), then b's prefill beside a's decode (45.025 ms)
    step = 802 * PREFILL_S_PER_TOKEN + 0.03
    assert (a.first_token, b.first_token) == (pytest.approx(0.057 + step), pytest.approx(0.057 + 2 * step + DECODE_S))


def test_shared_api_servers_stream_each_requests_tokens_back_through_its_own():
    run = CoupledRun(profile(), one_request(concurrency=4, requests=4), 2, 2)
    result = run.run()
    assert [f.outstanding for f in run.fronts] == [0, 0]
    assert [e.outstanding for e in run.engines] == [0, 0]
    assert all(r.finish == pytest.approx(r.first_token + DECODE_S) for r in result.requests)
    assert result.servers == {"language": 2, "api_server": 2}


def test_a_batch_of_exactly_the_budget_leaves_at_once():
    env, server, done = _vision(max_batch_tiles=2)
    server.submit(_request(0, images=(2,)), 0)
    env.run()
    assert done == [(0, 0, pytest.approx(0.02))]


def test_dvd_encodes_on_one_device_and_prefills_on_the_tensor_parallel_group():
    p = _derived(tensor_parallel=2).model_copy(update={"gateway": FrontendCosts(),
                                                       "language_frontend": FrontendCosts()})
    [r] = simulate_dvd(p, one_request(), 1, 1).requests
    vision = p.roofline.model_copy(update={"tensor_parallel": 1})
    assert vision.vision_seconds([1024] * 3) != pytest.approx(p.roofline.vision_seconds([1024] * 3))
    expected = (p.vision.max_batch_wait_s + vision.vision_seconds([1024] * 3)
                + p.transport.seconds(p.feature_bytes(768)) + _epd_prefill(p.roofline, 802))
    assert r.first_token == pytest.approx(expected, rel=1e-9)


def test_service_times_are_drawn_from_the_workloads_seed_step_by_step():
    """With spread, each device's work takes the next draw of one seeded sequence shared by the run's devices."""
    cv, seed = 0.3, 4
    load = one_request(seed=seed)
    p = profile().model_copy(update={"service_time_cv": cv})

    reference = Spread(cv, seed)
    [r] = simulate_coupled(p, load, 1).requests
    first = reference(802 * PREFILL_S_PER_TOKEN + 0.03)
    assert (r.first_token, r.finish) == (pytest.approx(first, rel=1e-12),
                                         pytest.approx(first + reference(DECODE_S), rel=1e-12))

    reference = Spread(cv, seed)
    [r] = simulate_dvd(p, load, 1, 1).requests
    first = BATCH_WAIT_S + reference(0.03) + wire_s(768) + reference(802 * PREFILL_S_PER_TOKEN)
    assert (r.first_token, r.finish) == (pytest.approx(first, rel=1e-12),
                                         pytest.approx(first + reference(DECODE_S), rel=1e-12))

    d = _derived().model_copy(update={"service_time_cv": cv, "api_server": FrontendCosts()})
    vision = d.roofline.model_copy(update={"tensor_parallel": 1})
    reference = Spread(cv, seed)
    [r] = simulate_epd(d, load, 1, 1, FrontendCosts(), SchedulerConfig()).requests
    first = (reference(vision.vision_seconds([1024] * 3)) + d.transport.seconds(d.feature_bytes(768))
             + reference(_epd_prefill(d.roofline, 802)))
    assert (r.first_token, r.finish) == (pytest.approx(first, rel=1e-12), pytest.approx(
        first + reference(_epd_decode(d.roofline, 803)), rel=1e-12))


def test_one_engines_tokens_stream_through_the_api_servers_their_requests_came_by():
    """Two API servers in front of one engine: a step's tokens of requests from each are streamed by each, side by
    side on their own cores."""
    p = profile()
    p.api_server = FrontendCosts(output_token_s=0.004)
    a, b = simulate_coupled(p, one_request(concurrency=2, requests=2), 1, api_servers=2).requests
    step = 2 * 802 * PREFILL_S_PER_TOKEN + 0.06  # both prefilled in one step, their six tiles encoded in it
    assert (a.first_token, b.first_token) == (pytest.approx(step + 0.004), pytest.approx(step + 0.004))
    assert (a.finish, b.finish) == (pytest.approx(step + DECODE_S + 0.004), pytest.approx(step + DECODE_S + 0.004))


def test_spreading_images_counts_each_image_in_flight_on_its_server():
    load = one_request(images_per_request=3, tiles_per_image=1, concurrency=2, requests=2)
    run = DvdRun(profile(), load, 2, [0, 1, 2], True, False)
    first, second = run.requests
    run.start(first)  # images 0 and 2 on server 0, image 1 on server 1
    run.start(second)  # server 1 has fewer in flight: image 0 there, then 1 and 2 alternate
    assert [run.vision_route[(1, i)] for i in range(3)] == [run.visions[1], run.visions[0], run.visions[1]]
    run.env.run()
    assert [v.outstanding for v in run.visions] == [0, 0]
    assert first.finish is not None and second.finish is not None


def test_a_coupled_api_server_on_a_time_sliced_device_shares_it_with_the_engine_slice_by_slice():
    p = profile(preprocess_s_per_tile=0.01)
    p.coupled = CoupledProfile(vision_seconds_per_tile=0.02, preprocess_s_per_tile=0.01, preprocess_on_device=True)
    p.timeslice_s = 0.001
    a, b = simulate_coupled(p, one_request(concurrency=2, requests=2), 1).requests
    prefill = 802 * PREFILL_S_PER_TOKEN + 3 * 0.02
    # image b (30 ms) and a's prefill step (70 ms) share the device from 30 ms in 1 ms turns: b's done at 90 ms,
    # a's step at 130 ms; b's prefill joins a's decode step
    assert (a.first_token, b.first_token) == (pytest.approx(0.03 + 0.03 + prefill),
                                              pytest.approx(0.06 + 2 * prefill + DECODE_S))


def test_a_round_stops_at_the_budget_even_between_images():
    env, server, done = _vision(max_batch_tiles=2)
    for i in range(3):
        server.submit(_request(i, images=(1,)), 0)
    env.run()
    # [a, b] -> 20 ms; c alone (its wait already past) -> 30 ms
    assert done == [(0, 0, pytest.approx(0.02)), (1, 0, pytest.approx(0.02)), (2, 0, pytest.approx(0.03))]


def test_an_image_that_arrives_during_a_batch_waits_from_its_own_arrival():
    env, server, done = _vision()
    a, b = _request(0, images=(1,)), _request(1, images=(1,))

    def submit():
        server.submit(a, 0)
        yield env.timeout(0.012)
        server.submit(b, 0)

    env.process(submit())
    env.run()
    # a: waits to 5 ms, encoded to 15 ms; b (in at 12 ms) waits to 17 ms, encoded to 27 ms
    assert done == [(0, 0, pytest.approx(0.015)), (1, 0, pytest.approx(0.027))]
