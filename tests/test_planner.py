"""Capacity planner: the simulation against known answers, profile and workload files, and `dvd plan` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from planner.derive import derive
from planner.files import ProfileError
from planner.plan import make_plan, run, sustained
from planner.profiles import (
    CoupledProfile,
    DecodePoint,
    Geometry,
    LanguageProfile,
    PrefillPoint,
    StageProfiles,
    TransportProfile,
    VisionPoint,
    VisionProfile,
)
from planner.simulate import simulate_dvd
from planner.workload import Workload

TINY = 1e-9  # a stage cost that is effectively free


def profile(vision_tiles_per_s: float = 100.0, prefill_s: float = 0.01, decode_step_s: float = 0.005,
            **vision) -> StageProfiles:
    """A small hand-made profile: flat vision throughput, prefill of one 800-token prompt, flat decode steps."""
    return StageProfiles(
        device="test device", geometry=Geometry(name="tiny", vision_hidden_size=64, language_hidden_size=64),
        vision=VisionProfile(batch_sweep=[VisionPoint(batch_tiles=1, tiles_per_s=vision_tiles_per_s)], **vision),
        language=LanguageProfile(prefill=[PrefillPoint(batch=1, context_tokens=800, seconds=prefill_s)],
                                 decode=[DecodePoint(batch=1, context_tokens=800, step_seconds=decode_step_s)]),
        transport=TransportProfile(bandwidth_gb_s=10.0, latency_s=1e-4),
    )


def workload(**fields) -> Workload:
    base = dict(images_per_request=1, tiles_per_image=3, text_tokens=32, output_tokens=16, arrival_rate=5.0,
                requests=300, ttft_slo_s=2.0, tpot_slo_s=0.1, gpus=4)
    return Workload(**(base | fields))


def test_vision_stage_alone_matches_the_md1_closed_form():
    """One-tile requests, no batching, free language side: mean TTFT is M/D/1's sojourn time."""
    mu, rho = 10.0, 0.6  # tiles/s of the vision server, utilisation
    profiles = profile(vision_tiles_per_s=mu, prefill_s=TINY, decode_step_s=TINY, max_batch_tiles=1,
                       max_batch_wait_s=0.0)
    profiles.transport = TransportProfile(bandwidth_gb_s=1e6, latency_s=0.0)
    load = workload(tiles_per_image=1, text_tokens=1, output_tokens=1, arrival_rate=rho * mu, requests=20_000)
    result = simulate_dvd(profiles, load, 1, 1)
    mean_ttft = np.mean([r.ttft for r in result.requests])
    closed_form = 1 / mu + rho / (2 * mu * (1 - rho))  # service + Pollaczek-Khinchine wait, deterministic service
    assert mean_ttft == pytest.approx(closed_form, rel=0.05)


def test_saturated_throughput_grows_with_gpus():
    profiles = profile()
    load = workload(arrival_rate=None, concurrency=64, requests=400)
    coupled = [run(profiles, load, 0, n).throughput_rps for n in (1, 2, 4)]
    dvd = [run(profiles, load, n, n).throughput_rps for n in (1, 2, 4)]
    assert coupled[0] < coupled[1] < coupled[2]
    assert dvd[0] < dvd[1] < dvd[2]


@pytest.mark.parametrize("slow, best", [("vision", (3, 1)), ("language", (1, 3))])
def test_the_slow_stage_is_named_and_gets_the_gpus(slow, best):
    profiles = profile(vision_tiles_per_s=30.0) if slow == "vision" else profile(prefill_s=0.05, decode_step_s=0.02)
    plan = make_plan(profiles, workload(requests=200, ttft_slo_s=1.0, tpot_slo_s=0.05), search=True,
                     search_options={"min_run_s": 15.0, "precision": 0.1})
    assert (plan.best.vision_gpus, plan.best.language_gpus) == best
    one_to_one = next(s for s in plan.dvd if s.vision_gpus == 2)
    assert one_to_one.bottleneck == slow


def test_coupled_decode_stalls_behind_the_encoder():
    """Heavy images: in one coupled engine every decode step waits for other requests' encodes."""
    profiles = profile(vision_tiles_per_s=60.0)
    load = workload(tiles_per_image=6, arrival_rate=4.0, requests=200)
    coupled, dvd = run(profiles, load, 0, 2), run(profiles, load, 1, 1)
    assert coupled.tpot_p90_s > 2 * dvd.tpot_p90_s


def test_vir_token_reduction_raises_a_prefill_bound_capacity():
    profiles = profile(prefill_s=0.08)
    base = sustained(profiles, workload(requests=200), 1, 1, percentiles=(90.0,), precision=0.1)[90.0]
    compressed = sustained(profiles, workload(requests=200, vir_compressed_share=1.0), 1, 1, percentiles=(90.0,),
                        precision=0.1)[90.0]
    assert compressed > 1.5 * base


def test_profile_file_round_trip(tmp_path):
    original = profile()
    original.save(tmp_path / "p.json")
    assert StageProfiles.load(tmp_path / "p.json") == original


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("vision"), "vision: Field required"),
    (lambda d: d["vision"]["batch_sweep"].append({"batch_tiles": 1, "tiles_per_s": 5}), "increasing and unique"),
    (lambda d: d["transport"].update(bandwidth_gb_s=-1), "transport.bandwidth_gb_s"),
    (lambda d: d["language"].update(decode=[]), "language.decode"),
    (lambda d: d.update(provenance="guessed"), "provenance"),
])
def test_bad_profile_files_name_the_field(tmp_path, change, message):
    data = json.loads(profile().model_dump_json())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message) as info:
        StageProfiles.load(path)
    assert str(path) in str(info.value)


def test_unreadable_files_and_bad_workloads_are_clear_errors(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not JSON"):
        StageProfiles.load(tmp_path / "x.json")
    with pytest.raises(ProfileError, match="no such profile"):
        StageProfiles.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="exactly one of arrival_rate"):
        workload(concurrency=4)
    with pytest.raises(ValueError, match="tiles_per_image: value 0"):
        workload(tiles_per_image={0: 1.0, 2: 1.0})


def test_derived_profile_is_labelled_and_matches_the_documented_vision_bound():
    """InternViT-300M: about 0.7 TFLOP per tile, so about 1,100 tiles/s at 800 TFLOP/s."""
    derived = derive("8b", profile(), device="H100 (derived)", peak_tflops=800, hbm_gb_s=3350, mfu=1.0,
                     step_overhead_s=0.0)
    assert derived.provenance == "derived" and "NOT MEASURED" in derived.notes
    assert derived.vision.batch_sweep[-1].tiles_per_s == pytest.approx(1100, rel=0.1)
    assert derived.geometry.language_hidden_size == 4096


def test_dvd_plan_cli_writes_table_and_plots(tmp_path):
    profile().save(tmp_path / "profile.json")
    (tmp_path / "workload.json").write_text(workload(requests=150).model_dump_json())
    out = tmp_path / "plan"
    command = [sys.executable, "-m", "dvd.cli", "plan", "run", "--profiles", str(tmp_path / "profile.json"),
               "--workload", str(tmp_path / "workload.json"), "--out", str(out), "--gpus", "3", "--min-run-s", "15"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| **" in done.stdout and "coupled x3" in done.stdout and "Best split" in done.stdout
    table = (out / "plan.md").read_text()
    assert table.count("\n| ") == 4  # header + 1V:2L, 2V:1L + coupled
    plan = json.loads((out / "plan.json").read_text())
    assert plan["best"]["vision_gpus"] + plan["best"]["language_gpus"] == 3 and plan["gain"] > 0
    for name in ("plan_capacity.png", "plan_latency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (tmp_path / "broken.json").write_text("{}")
    bad = subprocess.run(command[:6] + [str(tmp_path / "broken.json")] + command[7:], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "broken.json" in bad.stderr and "device" in bad.stderr


def test_preprocessing_on_the_encoders_core_lowers_vision_capacity():
    """A CPU vision server decodes and tiles on the core its encoder uses; a GPU server does it beside."""
    load = workload(arrival_rate=None, concurrency=16, requests=200)
    beside = run(profile(vision_tiles_per_s=60.0, preprocess_s_per_tile=0.01), load, 1, 1)
    shared = run(profile(vision_tiles_per_s=60.0, preprocess_s_per_tile=0.01, preprocess_on_device=True), load, 1, 1)
    # 3 tiles per request: 50 ms of encoder time, plus 30 ms of preprocessing when both share the core
    assert beside.throughput_rps == pytest.approx(60 / 3, rel=0.1)
    assert shared.throughput_rps == pytest.approx(1 / 0.08, rel=0.1)


def test_servers_placed_on_one_device_take_turns_on_it():
    """Two servers on one device: their busy times add up, so the pair serves at most what the device does."""
    profiles = profile(vision_tiles_per_s=60.0, prefill_s=0.02, decode_step_s=TINY)  # 50 ms + 20 ms per request
    load = workload(arrival_rate=None, concurrency=16, requests=200, output_tokens=1)
    apart = run(profiles, load, 1, 1)
    together = run(profiles, load, 1, 1, devices=[0, 0])
    assert apart.throughput_rps == pytest.approx(1 / 0.05, rel=0.1)  # the vision server alone is the limit
    assert together.throughput_rps < 1 / 0.07 * 1.05  # 70 ms of one device per request, prefills not batched less
    assert together.throughput_rps < 0.8 * apart.throughput_rps
    with pytest.raises(ValueError, match="devices"):
        run(profiles, load, 1, 1, devices=[0])


def test_a_measured_coupled_profile_replaces_the_derived_costs():
    """The coupled engine's measured encoder cost, not the vision server's, sets coupled capacity."""
    load = workload(arrival_rate=None, concurrency=16, requests=200, output_tokens=1)
    derived = profile(vision_tiles_per_s=300.0, prefill_s=TINY, decode_step_s=TINY)
    measured = derived.model_copy(update={"coupled": CoupledProfile(vision_seconds_per_tile=0.02)})
    assert run(derived, load, 0, 1).throughput_rps == pytest.approx(300 / 3, rel=0.1)
    assert run(measured, load, 0, 1).throughput_rps == pytest.approx(1 / 0.06, rel=0.1)
    slow_api = measured.model_copy(update={"coupled": CoupledProfile(vision_seconds_per_tile=TINY,
                                                                     preprocess_s_per_tile=0.05)})
    assert run(slow_api, load, 0, 1).throughput_rps == pytest.approx(1 / 0.15, rel=0.1)  # one processor thread
    one_core = measured.model_copy(update={"coupled": CoupledProfile(vision_seconds_per_tile=0.02,
                                                                     preprocess_s_per_tile=0.01,
                                                                     preprocess_on_device=True)})
    # 60 ms of encoder in the step plus 30 ms of the API server's image work on the same device
    assert run(one_core, load, 0, 1).throughput_rps == pytest.approx(1 / 0.09, rel=0.1)


def test_a_time_sliced_device_lets_a_short_job_pass_a_long_one():
    """Whole turns: a short job waits for the long one before it. Slices (a CPU core shared by threads): both
    progress at half speed, so the short one is done after twice its own length."""
    import simpy

    from planner.simulate import Device, Spread

    def finish_times(timeslice_s):
        env, done = simpy.Environment(), {}

        def job(name, start, seconds):
            yield env.timeout(start)
            yield from device.run(seconds)
            done[name] = env.now

        device = Device(env, timeslice_s, Spread(0.0, seed=0))
        env.process(job("long", 0.0, 1.0))
        env.process(job("short", 0.01, 0.1))
        env.run()
        return done

    whole, sliced = finish_times(None), finish_times(0.001)
    assert whole == pytest.approx({"long": 1.0, "short": 1.1})
    assert sliced["short"] == pytest.approx(0.01 + 2 * 0.1, abs=0.003)
    assert sliced["long"] == pytest.approx(1.1, abs=0.003)  # the device is never idle: the total is the same


def test_service_time_spread_keeps_the_mean_and_breaks_lock_step():
    """Drawn service times have the profile's mean and measured spread; in a closed loop they spread TTFTs
    that noiseless service times bunch into waves, and one seed always gives the same run."""
    from planner.simulate import Spread

    spread = Spread(0.2, seed=3)
    draws = np.array([spread(0.05) for _ in range(20_000)])
    assert draws.mean() == pytest.approx(0.05, rel=0.01)
    assert draws.std() / draws.mean() == pytest.approx(0.2, rel=0.05)
    assert Spread(0.0, seed=3)(0.05) == 0.05

    load = workload(arrival_rate=None, concurrency=8, requests=200)
    base = profile(vision_tiles_per_s=60.0, preprocess_s_per_tile=0.008, preprocess_on_device=True,
                   preprocess_parallelism=2, decode_step_s=0.02)
    noisy = base.model_copy(update={"service_time_cv": 0.2, "timeslice_s": 0.0015})
    quiet_ttfts = {round(r.ttft, 9) for r in simulate_dvd(base, load, 1, 1).requests}
    noisy_ttfts = {round(r.ttft, 9) for r in simulate_dvd(noisy, load, 1, 1).requests}
    assert len(noisy_ttfts) > 2 * len(quiet_ttfts)
    assert run(noisy, load, 1, 1) == run(noisy, load, 1, 1)
    assert run(noisy, load, 1, 1) != run(noisy, load.model_copy(update={"seed": 1}), 1, 1)


def test_relative_spread_pools_repeated_measurements():
    from benchmarks.plan_validation.stage_profiles import relative_spread

    assert relative_spread([[2.0, 2.0, 2.0], [5.0]]) == 0.0
    assert relative_spread([[0.9, 1.1], [1.8, 2.2]]) == pytest.approx(0.1)


# ---------------------------------------------------------------- vLLM's engine, the roofline, geometry, sustained


def _engines(config, cost, count: int = 1, lockstep: bool = False):
    """Simulated vLLM engines, each on a whole-turn device, stepping together (`lockstep`: data-parallel ranks
    under vLLM's `DPEngineCoreProc`) or each on its own; returns (env, engines, token times per request index)."""
    import simpy

    from planner.engine import Engine, Lockstep
    from planner.simulate import Device, Spread

    env = simpy.Environment()
    times: dict[int, list[float]] = {}

    def output(sampled):
        for r in sampled:
            times.setdefault(r.index, []).append(env.now)

    group = Lockstep(env) if lockstep else None
    engines = [Engine(env, config, cost, Device(env, None, Spread(0.0, 0)), output, encoder=True, lockstep=group)
               for _ in range(count)]
    return env, engines, times


def _engine(config, cost):
    """One simulated vLLM engine; returns (env, engine, token times per request index)."""
    env, (engine,), times = _engines(config, cost)
    return env, engine, times


def _add_at(env, engine, seconds: float, request) -> None:
    """Hand `engine` the request at simulated time `seconds`."""
    def later():
        yield env.timeout(seconds)
        engine.add(request)
    env.process(later())


def _request(index, text, images=(), output=4, images_first=True):
    from planner.engine import Request

    return Request(index, 0.0, [[1024] * 1 for _ in images], list(images), text, output, images_first=images_first)


def test_a_step_that_encodes_an_image_delays_every_running_decode():
    """Coupled vLLM: the encoder runs inside the step, so a decode in flight waits for another request's image."""
    from planner.engine import SchedulerConfig

    def cost(shape, sequences):  # 10 ms per step, 500 ms per encoder sequence
        return 0.01 + 0.5 * len(sequences), 0.0

    env, engine, times = _engine(SchedulerConfig(max_num_batched_tokens=4096), cost)
    engine.add(_request(0, text=100, output=50))
    _add_at(env, engine, 0.105, _request(1, text=10, images=[256], output=2))
    env.run()
    gaps = np.diff(times[0])
    assert max(gaps) == pytest.approx(0.51)  # the step with the image: decode and encoder together
    assert sorted(gaps)[-2] == pytest.approx(0.01)  # every other step is a plain decode step
    assert times[1][0] == pytest.approx(times[0][int(np.argmax(gaps)) + 1])  # the image's request prefilled then


def _two_ranks(lockstep: bool):
    """Two engines, each step costing 10 ms, 0.1 ms per prefill token and 50 ms per encoder sequence."""
    from planner.engine import SchedulerConfig

    def cost(shape, sequences):
        return 0.01 + 1e-4 * sum(shape.prefill_chunks) + 0.05 * len(sequences), 0.0

    return _engines(SchedulerConfig(max_num_batched_tokens=4096), cost, count=2, lockstep=lockstep)


def _decodes_beside_a_late_prompt(lockstep: bool) -> tuple[np.ndarray, list[float]]:
    """Rank 0 decodes 30 tokens; at 55 ms rank 1 gets a 1,000-token prompt and one image. Returns rank 0's gaps
    between tokens and rank 1's token times."""
    env, (first, second), times = _two_ranks(lockstep)
    first.add(_request(0, text=10, output=30))
    _add_at(env, second, 0.055, _request(1, text=1000, images=[256], output=2))
    env.run()
    return np.diff(times[0]), times[1]


def test_a_lockstep_ranks_decodes_wait_for_another_ranks_prefill_and_its_encoder():
    gaps, late = _decodes_beside_a_late_prompt(lockstep=True)
    # rank 1's step: its 1,258-token prefill (rank 0's forward padded to it) and its encoder
    assert max(gaps) == pytest.approx(0.01 + 1e-4 * 1258 + 0.05)
    assert sorted(gaps)[-2] == pytest.approx(0.01)  # every other step is a decode step on both ranks
    # rank 1 waits for the step in flight: rank 0's steps end at 11 ms (its 10-token prompt), 21 ms, ... 61 ms
    assert late[0] == pytest.approx(0.061 + 0.01 + 1e-4 * 1258 + 0.05)


def test_separate_engines_never_wait_for_each_other():
    gaps, late = _decodes_beside_a_late_prompt(lockstep=False)
    assert gaps == pytest.approx([0.01] * 29)
    assert late[0] == pytest.approx(0.055 + 0.01 + 1e-4 * 1258 + 0.05)  # rank 1 starts at once


def test_an_idle_lockstep_rank_runs_dummy_steps_padded_to_the_busy_ranks_tokens():
    env, (idle, busy), _ = _two_ranks(lockstep=True)
    busy.add(_request(0, text=1000, images=[256], output=3))
    env.run()
    assert idle.steps == busy.steps == 3
    assert idle.busy_s == pytest.approx(busy.busy_s - 0.05)  # the encoder is the busy rank's own; the forward not


def test_lockstep_is_one_data_parallel_vllm_serve_not_separate_instances():
    from planner.simulate import simulate_coupled

    with pytest.raises(ValueError, match="one data-parallel"):
        simulate_coupled(profile(), workload(requests=1), replicas=2, api_servers=None, lockstep=True)


def test_chunked_prefill_keeps_every_step_within_the_token_budget_and_serves_running_requests_first():
    from planner.engine import SchedulerConfig

    steps = []

    def cost(shape, sequences):
        steps.append((shape.tokens, shape.decodes, list(shape.prefill_chunks)))
        return 0.01, 0.0

    env, engine, times = _engine(SchedulerConfig(max_num_batched_tokens=512), cost)
    engine.add(_request(0, text=8, output=20))
    env.run(until=0.025)  # request 0 is decoding
    engine.add(_request(1, text=2000, output=2))
    env.run()
    assert all(tokens <= 512 for tokens, _, _ in steps)
    chunks = [c for _, _, prefill in steps for c in prefill]
    assert chunks[1:] == [511, 511, 511, 467]  # beside request 0's decode, which is scheduled first
    assert all(decodes == 1 for _, decodes, prefill in steps[1:5])
    # added during the third step (t=0.02..0.03); four chunks from t=0.03: first token at 0.07
    assert times[1] == pytest.approx([0.07, 0.08])


def test_an_image_that_does_not_fit_the_encoder_budget_stops_the_chunk_before_it():
    """vLLM's `_try_schedule_encoder_inputs`: an image is encoded whole in the step that first touches it; past
    the step's encoder budget the chunk ends where the image begins, and the image goes in the next step."""
    from planner.engine import SchedulerConfig

    encoded = []

    def cost(shape, sequences):
        encoded.append((len(sequences), list(shape.prefill_chunks)))
        return 0.01, 0.0

    config = SchedulerConfig(max_num_batched_tokens=4096, encoder_compute_budget=300, encoder_cache_size=1000)
    env, engine, _ = _engine(config, cost)
    engine.add(_request(0, text=100, images=[256, 256], output=1, images_first=False))
    env.run()
    # text, the first image between its markers and the second's opening marker, cut where the second image's
    # features begin; then the second image and its closing marker
    assert encoded == [(1, [100 + (1 + 256 + 1) + 1]), (1, [256 + 1])]


def test_tensor_parallelism_halves_the_weights_each_device_reads_and_adds_two_all_reduces_per_layer():
    from planner.geometry import geometry
    from planner.hardware import ACCELERATORS
    from planner.roofline import Efficiency, Roofline, StepShape

    model, h100 = geometry("38b"), ACCELERATORS["h100-sxm"]
    eff = Efficiency(allreduce_latency_s=1e-5)
    one = Roofline(accelerator=h100, model=model, tensor_parallel=1, efficiency=eff)
    two = one.model_copy(update={"tensor_parallel": 2})
    decode = StepShape()
    decode.add_chunk(1, 1000, decode=True)
    layers, hidden = model.language.num_layers, model.language.hidden_size
    all_reduce = 2 * layers * (1e-5 + 2 * (2 - 1) / 2 * hidden * 2 / (h100.nvlink_gb_s * 1e9))
    assert two.language_seconds(decode) == pytest.approx(one.language_seconds(decode) / 2 + all_reduce, rel=0.02)
    assert two.kv_capacity_tokens() > 0
    with pytest.raises(ValueError, match="does not fit 1 x NVIDIA H100"):
        one.kv_capacity_tokens()


def test_image_tokens_follow_each_models_rule():
    from planner.geometry import geometry

    qwen, internvl = geometry("qwen3-vl-4b"), geometry("8b")
    assert qwen.image_tokens(640, 640) == 400 and qwen.image_sequences(640, 640) == [1600]
    assert qwen.image_tokens(1000, 500) == 16 * 31 // 1  # 500x1000 -> 512x992 px -> 16x31 merged tokens
    assert internvl.image_tokens(1920, 1080) == 9 * 256 and len(internvl.image_sequences(1920, 1080)) == 9
    assert internvl.image_tokens(448, 448) == 256


def test_an_moe_layer_reads_only_the_experts_its_tokens_route_to():
    from planner.geometry import LanguageModel

    moe = LanguageModel(hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
                        intermediate_size=6144, vocab_size=151936, num_experts=128, experts_per_token=8,
                        expert_intermediate_size=768)
    assert moe.experts_touched(1) == pytest.approx(8)
    assert moe.experts_touched(10_000) == pytest.approx(128)
    assert moe.active_params() < 0.15 * moe.weight_params()


def test_the_sustained_criterion_rejects_a_growing_queue_that_has_not_yet_broken_the_slo():
    from planner.sustained import Criterion, Record, judge

    criterion = Criterion(ttft_slo_s=10.0, tpot_slo_s=0.1)
    steady = [Record(i * 0.1, 1.0 + 0.1 * (i % 3), 0.05) for i in range(300)]
    growing = [Record(i * 0.1, 1.0 + 0.02 * i, 0.05) for i in range(300)]  # 1 s -> 7 s: every one within SLO
    assert judge(steady, criterion, 99).passed
    verdict = judge(growing, criterion, 99)
    assert verdict.within_slo and not verdict.sustained and verdict.reason == "queue growing"
    unfinished = steady[:-1] + [Record(30.0, None, None)]
    assert not judge(unfinished, criterion, 90).within_slo


def test_one_api_server_caps_a_data_parallel_deployment_whatever_its_engines():
    """vLLM's API server processes every image on one worker: four engines behind one process serve no more than
    that process does; one API server per engine (vLLM 0.32's default) lifts the cap."""
    from planner.profiles import FrontendCosts

    fast = profile(vision_tiles_per_s=1000.0, prefill_s=TINY, decode_step_s=TINY)
    fast.api_server = FrontendCosts(image_s=0.05)  # 50 ms per image, nothing else
    load = workload(arrival_rate=None, concurrency=32, requests=300, output_tokens=2)
    one = run(fast, load, 0, 4, api_servers=1)
    four = run(fast, load, 0, 4, api_servers=4)
    assert one.throughput_rps == pytest.approx(20, rel=0.1)
    assert four.throughput_rps == pytest.approx(80, rel=0.15)
    assert one.bottleneck == "api_server"


def test_spreading_a_requests_images_over_vision_servers_encodes_them_side_by_side():
    """Two vision servers, two-image requests, one at a time: spread, each image has a server of its own."""
    profiles = profile(vision_tiles_per_s=30.0, prefill_s=TINY, decode_step_s=TINY, max_batch_wait_s=0.0)
    load = workload(images_per_request=2, tiles_per_image=3, arrival_rate=0.5, requests=40, output_tokens=2)
    whole = run(profiles, load, 2, 1)
    spread = run(profiles, load, 2, 1, spread_images=True)
    assert whole.ttft_p50_s == pytest.approx(6 / 30, rel=0.1)  # six tiles on one server
    assert spread.ttft_p50_s == pytest.approx(3 / 30, rel=0.1)  # three on each


def test_prefill_starts_on_the_text_before_the_images_features_arrive():
    """A language server that prefills up to the first missing image overlaps the text's prefill with the
    encode; one that waits for every feature does them one after the other."""
    from planner.profiles import LanguageProfile

    profiles = profile(vision_tiles_per_s=2.0, decode_step_s=TINY, max_batch_wait_s=0.0)  # 0.5 s per image
    # prefill: 0.2 ms per token, whatever the batch (one point per batch size)
    profiles.language = LanguageProfile(
        prefill=[PrefillPoint(batch=1, context_tokens=1000, seconds=0.2)],
        decode=[DecodePoint(batch=1, context_tokens=1000, step_seconds=TINY)],
        max_batched_tokens=1 << 20)
    profiles.language.max_num_seqs = 8
    load = workload(images_per_request=1, tiles_per_image=1, text_tokens=1000, images_first=False,
                    arrival_rate=0.2, requests=20, output_tokens=2)
    waiting = run(profiles, load, 1, 1)
    streaming = run(profiles, load, 1, 1, prefill_as_features_arrive=True)
    # waiting: the 0.5 s encode, then 1000 text + 258 image tokens (0.25 s); streaming: the text's 0.2 s during
    # the encode, then the image's tokens
    assert waiting.ttft_p50_s == pytest.approx(0.5 + 1258 * 2e-4, rel=0.05)
    assert streaming.ttft_p50_s == pytest.approx(0.5 + 257 * 2e-4, rel=0.05)


def test_dvd_plan_derive_sizes_38b_with_tensor_parallelism_2_and_refuses_it_on_one_gpu(tmp_path):
    host = tmp_path / "host.json"
    profile().save(host)
    command = [sys.executable, "-m", "dvd.cli", "plan", "derive", str(tmp_path / "p.json"), "--preset", "38b",
               "--accelerator", "h100-sxm", "--host-profile", str(host), "--api-server-costs",
               str(Path(__file__).parents[1] / "benchmarks" / "results" / "mm_processor_cpu.json"),
               "--tensor-parallel-size"]
    done = subprocess.run(command + ["2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    derived = StageProfiles.load(tmp_path / "p.json")
    assert derived.roofline.tensor_parallel == 2 and "NOT MEASURED" in derived.notes
    assert derived.scheduler.max_num_batched_tokens == 8192  # vLLM's H100 default
    refused = subprocess.run(command + ["1"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "does not fit 1 x NVIDIA H100 SXM" in refused.stderr


@pytest.mark.parametrize("file", ["mm_processor_cpu.json", "mm_processor_cpu_vllm_0.12.json"])
def test_api_server_costs_read_each_committed_measurement(file):
    """Both layouts of the measurement files: the machine's `cores` (older) and `cpus` (benchmarks/toolkit)."""
    from planner.derive import api_server_costs
    from planner.geometry import QWEN3_VL_4B

    measured = Path(__file__).parents[1] / "benchmarks" / "results" / file
    fit = json.loads(measured.read_text())["models"]["qwen3-vl"]["fit"]
    costs = api_server_costs(QWEN3_VL_4B, measured)
    assert costs.image_s == fit["image_s"] > 0 and costs.output_token_s == fit["output_token_s"] > 0
    assert costs.image_text_token_s == fit.get("image_text_token_s", 0.0)
    assert "(2 cores), qwen3-vl processor" in costs.source
