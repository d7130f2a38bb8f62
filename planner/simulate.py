"""Discrete-event simulation of DvD and of coupled serving on the same devices, fed by stage profiles.

Why simulation (simpy) and not a queueing formula: the stages interact in ways closed forms miss — a vision
server waits up to `max_batch_wait_s` to fill a batch, so its speed depends on the load; a language engine
batches continuously (`planner.engine`, vLLM's scheduler), so a request's decode step costs what the other
requests in flight make it cost; a request needs every image's features before its prefill, so it waits for
the slowest of several parallel encodes; in coupled serving the encoder runs inside the engine's step,
stalling every decode in flight; and one API server process can serve several engines, its images queued on
one worker. simpy (processes, events, resources) expresses those directly; an M/D/1 case checks it against the
closed form in the tests.

Three deployments:
- coupled: vLLM serving the whole model, one engine per device (data parallel), its API server(s) in front;
- DvD: gateway -> vision servers (tiles batched across requests) and language servers (vLLM without the
  encoder), features over one link per language server;
- vLLM's own encoder disaggregation (`simulate_epd`): a proxy sends each image to an encoder-only vLLM
  instance, waits, then sends the request to a prefill/decode instance that loads the features (the
  published anchor).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import simpy

from planner.engine import Engine, Lockstep, Request, SchedulerConfig
from planner.geometry import NativeImages
from planner.profiles import FrontendCosts, StageProfiles
from planner.roofline import Roofline, StepShape
from planner.workload import Workload, draw, mean

__all__ = ["Request", "Result", "make_requests", "simulate_coupled", "simulate_dvd", "simulate_epd", "pool_loads"]


@dataclass
class Result:
    """One simulated run: its requests, and how busy each pool was."""

    system: str  # "dvd", "coupled" or "epd"
    vision_servers: int
    language_servers: int
    requests: list[Request]
    busy_s: dict[str, float] = field(default_factory=dict)  # pool -> busy seconds, summed over its servers
    servers: dict[str, int] = field(default_factory=dict)  # pool -> how many


def make_requests(workload: Workload, profiles: StageProfiles) -> list[Request]:
    """The workload's requests (arrival times set later by the arrival process), the same for every system."""
    rng = np.random.default_rng(workload.seed)
    model = profiles.roofline.model if profiles.roofline else None
    full, small = profiles.geometry.tokens_per_tile, profiles.geometry.compressed_tokens_per_tile
    if model is not None and not isinstance(model.images, NativeImages):
        full, small = model.images.tokens_per_tile, model.images.compressed_tokens_per_tile
    tile_patches = (model.images.tile_px // model.vision.patch_size) ** 2 if model and not isinstance(
        model.images, NativeImages) else 1024
    if model is not None and isinstance(model.images, NativeImages) and workload.image_px is None:
        raise ValueError(f"{model.name} takes images at their own resolution: give the workload's image_px")
    if workload.image_px is not None and model is None:
        raise ValueError("image_px needs a derived profile (its model geometry turns pixels into tokens)")
    requests = []
    for i in range(workload.requests):
        sequences, tokens = [], []
        for _ in range(draw(workload.images_per_request, rng)):
            if workload.image_px is not None:
                seqs = model.image_sequences(*workload.image_px)
            else:
                seqs = [tile_patches] * draw(workload.tiles_per_image, rng)
            if model is not None and isinstance(model.images, NativeImages):
                count = model.image_tokens(*workload.image_px)
            else:
                compressed = int(rng.binomial(len(seqs), workload.vir_compressed_share)) \
                    if workload.vir_compressed_share else 0
                count = compressed * small + (len(seqs) - compressed) * full
            sequences.append(seqs)
            tokens.append(count)
        requests.append(Request(i, 0.0, sequences, tokens, draw(workload.text_tokens, rng),
                                draw(workload.output_tokens, rng), images_first=workload.images_first))
    return requests


class Spread:
    """Service times drawn around the profile's figure with its measured spread (lognormal, same mean), so
    simulated servers drift out of step as real ones do; a noiseless closed loop runs in lock-step waves."""

    def __init__(self, cv: float, seed: int):
        self.sigma = float(np.sqrt(np.log1p(cv * cv)))
        self.rng = np.random.default_rng([seed, 2])

    def __call__(self, seconds: float) -> float:
        if not self.sigma or not seconds:
            return seconds
        return seconds * float(self.rng.lognormal(-self.sigma ** 2 / 2, self.sigma))


class Device:
    """One device (or CPU core), shared by the servers placed on it and by a server's own threads.

    Jobs take turns: each runs whole, in arrival order (`timeslice_s` None), or round robin in slices of
    `timeslice_s`, as an OS scheduler shares a CPU core among threads and processes (processor sharing
    as the slice shrinks): a short job beside a long one then finishes early instead of waiting for it.
    """

    def __init__(self, env: simpy.Environment, timeslice_s: float | None, spread: Spread, exclusive: bool = False):
        """`exclusive`: one job at a time ever runs here (an engine alone on its GPU), so no turns are kept."""
        self.env, self.timeslice_s, self.spread, self.exclusive = env, timeslice_s, spread, exclusive
        self._turns = simpy.Resource(env, capacity=1)

    def run(self, seconds: float):
        """A simpy process body: about `seconds` (see `Spread`) of this device, in turns with other jobs."""
        left = self.spread(seconds)
        if self.exclusive:
            yield self.env.timeout(left)
            return
        while left > 1e-12:
            piece = left if self.timeslice_s is None else min(left, self.timeslice_s)
            with self._turns.request() as turn:
                yield turn
                yield self.env.timeout(piece)
            left -= piece


class Host:
    """Host cores of their own (worker threads beside a GPU): work takes its time, with no turns to wait."""

    def __init__(self, env: simpy.Environment, profiles: StageProfiles, workload: Workload):
        self.env, self.spread = env, Spread(profiles.service_time_cv, workload.seed + 1)

    def run(self, seconds: float):
        yield self.env.timeout(self.spread(seconds))


def devices_for(env: simpy.Environment, profiles: StageProfiles, workload: Workload, count: int,
                exclusive: bool = False) -> list[Device]:
    spread = Spread(profiles.service_time_cv, workload.seed)
    return [Device(env, profiles.timeslice_s, spread, exclusive) for _ in range(count)]


Sampled = list[tuple[Request, int]]  # requests that got a token in one engine step, with their token count then


class Frontend:
    """One front-end process (`FrontendCosts`): its event loop's work and its one multimodal worker share a core
    (its own, or a device's); `latency_s` is time every request spends in it without using that core."""

    def __init__(self, env: simpy.Environment, costs: FrontendCosts, spread: Spread, core: Device | None = None,
                 mm_workers: int = 1, latency_s: float = 0.0):
        self.env, self.costs, self.latency_s = env, costs, latency_s
        self.core = core or Device(env, costs.slice_s, spread)
        self.mm_worker = simpy.Resource(env, capacity=mm_workers)
        self.busy_s = 0.0
        self.outstanding = 0
        self._owed_s = 0.0

    def _run(self, seconds: float):
        self.busy_s += seconds
        yield from self.core.run(seconds)

    def take(self, r: Request, then) -> None:
        """Parse, render and process `r`'s input, then hand it on with `then(r)`."""
        self.env.process(self._take(r, then))

    def _take(self, r: Request, then):
        c = self.costs
        if self.latency_s:
            yield self.env.timeout(self.latency_s)
        images = len(r.sequences)
        text_s = r.text_tokens * c.text_token_s
        if c.request_s or (text_s and not images):
            yield from self._run(c.request_s + (0.0 if images else text_s))
        mm_s = (images * (c.image_s + r.text_tokens * c.image_text_token_s)
                + sum(len(s) for s in r.sequences) * c.tile_s + (text_s if images else 0.0))
        if mm_s:
            with self.mm_worker.request() as worker:
                yield worker
                yield from self._run(mm_s)
        then(r)

    def charge(self, tokens: int) -> None:
        """Owe the streaming work of `tokens` output tokens; it runs with the next delivery (see `stream`)."""
        self._owed_s += tokens * self.costs.output_token_s

    def stream(self, sampled: Sampled, then, charged: bool = False) -> None:
        """Stream one step's tokens on, then hand the first and last tokens among them to `then`. Only those
        mark anything a client measures, so the work of the others is owed and done with the next delivery,
        or once a GIL slice of it has piled up: the CPU the process spends is the same, in fewer events.
        `charged`: the tokens' work was owed already (`charge`)."""
        if not charged:
            self.charge(len(sampled))
        deliver = [(r, n) for r, n in sampled if n == 1 or n >= r.output_tokens]
        if not deliver and self._owed_s < self.costs.slice_s:
            return
        seconds, self._owed_s = self._owed_s, 0.0
        if not seconds:
            then(deliver)
            return
        self.env.process(self._stream(seconds, deliver, then))

    def _stream(self, seconds: float, deliver: Sampled, then):
        yield from self._run(seconds)
        if deliver:
            then(deliver)


class Client:
    """Where tokens arrive: a request's first and last token times, and the closed loop's finished queue."""

    def __init__(self, env: simpy.Environment):
        self.env, self.finished = env, simpy.Store(env)

    def receive(self, sampled: Sampled) -> None:
        for r, count in sampled:
            if r.first_token is None:
                r.first_token = self.env.now
            if count >= r.output_tokens and r.finish is None:
                r.finish = self.env.now
                self.finished.put(r)


def _relay(front: Frontend, sampled: Sampled, second: str, final) -> None:
    """One step's tokens through `front`, then through each request's `second` front end (DvD's gateway, vLLM's
    proxy) to `final`; the second front end is charged for every token now and delivers the first and last."""
    for r, _ in sampled:
        getattr(r, second).charge(1)

    def onward(deliver: Sampled) -> None:
        for nxt in {id(getattr(r, second)): getattr(r, second) for r, _ in deliver}.values():
            nxt.stream([(r, n) for r, n in deliver if getattr(r, second) is nxt], final, charged=True)
    front.stream(sampled, onward)


def step_cost(profiles: StageProfiles, roofline: Roofline | None = None, language: bool = True):
    """What one engine step costs: from the roofline (derived profiles) or the measured tables; the encoder's
    sequences run in the same step (coupled serving). `language` False: an encoder-only engine."""
    roofline = roofline or profiles.roofline
    if roofline is not None:
        host_s = roofline.efficiency.step_host_s

        def derived(shape: StepShape, sequences: list[int]) -> tuple[float, float]:
            lm = roofline.language_seconds(shape) if language else 0.0
            return lm + roofline.vision_seconds(sequences), host_s
        return derived
    tables, coupled = profiles.language, profiles.coupled

    def measured(shape: StepShape, sequences: list[int]) -> tuple[float, float]:
        seconds = 0.0
        if language and shape.decodes:
            seconds += tables.decode_step_seconds(shape.decodes, shape.decode_context / shape.decodes)
        if language:
            seconds += tables.prefill_seconds(shape.prefill_chunks)
        if sequences:
            seconds += (len(sequences) * coupled.vision_seconds_per_tile if coupled
                        else profiles.vision.batch_seconds(len(sequences)))
        return seconds, 0.0
    return measured


def engine_config(profiles: StageProfiles, roofline: Roofline | None, vision_weights: bool) -> SchedulerConfig:
    """The scheduler settings, with the KV cache an engine of this roofline holds."""
    config = profiles.engine_scheduler()
    if roofline is not None and config.kv_cache_tokens is None:
        config = config.model_copy(update={"kv_cache_tokens": roofline.kv_capacity_tokens(
            vision_weights=vision_weights)})
    return config


def _coupled_frontend(profiles: StageProfiles) -> tuple[FrontendCosts, bool, int, float]:
    """vLLM's API server: (costs, on the engine's device, multimodal workers, latency outside the core). A
    derived profile states it; a measured CPU profile has the measured `coupled` figures, or the vision server's."""
    if profiles.api_server:
        return profiles.api_server, False, 1, 0.0
    if profiles.coupled:
        c = profiles.coupled
        return (FrontendCosts(tile_s=c.preprocess_s_per_tile), c.preprocess_on_device, c.preprocess_parallelism,
                c.overhead_s_per_request)
    v = profiles.vision
    return (FrontendCosts(tile_s=v.preprocess_s_per_tile), False, v.preprocess_parallelism,
            profiles.language.overhead_s_per_request)


def _arrivals(env: simpy.Environment, workload: Workload, requests: list[Request], start, finished: simpy.Store):
    """Open loop: Poisson arrivals. Closed loop: `concurrency` clients, each sending when its last reply ends."""
    if workload.arrival_rate:
        rng = np.random.default_rng(workload.seed + 1)
        for r in requests:
            yield env.timeout(rng.exponential(1 / workload.arrival_rate))
            r.arrival = env.now
            start(r)
        return
    pending = deque(requests)
    for _ in range(min(workload.concurrency, len(pending))):
        r = pending.popleft()
        r.arrival = env.now
        start(r)
    while pending:
        yield finished.get()
        r = pending.popleft()
        r.arrival = env.now
        start(r)


def _least_outstanding(servers):
    return min(servers, key=lambda s: s.outstanding)


def simulate_coupled(profiles: StageProfiles, workload: Workload, replicas: int,
                     api_servers: int | None = None, lockstep: bool = False) -> Result:
    """Coupled serving: each device runs encoder and language model in one vLLM engine.

    `api_servers` None: `replicas` separate `vllm serve` instances behind a balancer (least outstanding
    requests), each with its own API server. A number: one data-parallel `vllm serve` whose API servers (that
    many) share the engines through vLLM's balancer (fewest requests in flight, `Engine.load_score`). A derived
    profile's `api_server.processes` gives that number unless it is given here. `lockstep`: that `vllm serve`'s
    engines step together (`planner.engine.Lockstep`: vLLM 0.12 for any model, later releases for a mixture of
    experts).
    """
    return CoupledRun(profiles, workload, replicas, api_servers, lockstep).run()


class CoupledRun:
    """One simulated run of coupled serving (`simulate_coupled`): its engines, its API servers, and how a request
    goes through them."""

    def __init__(self, profiles: StageProfiles, workload: Workload, replicas: int, api_servers: int | None,
                 lockstep: bool = False):
        self.workload, self.replicas = workload, replicas
        self.env = env = simpy.Environment()
        self.requests = make_requests(workload, profiles)
        self.client = Client(env)
        spread = Spread(profiles.service_time_cv, workload.seed)
        costs, on_device, mm_workers, latency_s = _coupled_frontend(profiles)
        if api_servers is None and profiles.api_server is not None:
            api_servers = profiles.api_server.processes or replicas
        self.api_servers = api_servers
        devices = devices_for(env, profiles, workload, replicas, exclusive=not on_device)
        config = engine_config(profiles, profiles.roofline, vision_weights=True)
        cost = step_cost(profiles)
        if lockstep and api_servers is None:
            raise ValueError("lockstep needs one data-parallel `vllm serve` (api_servers), not separate instances")
        group = Lockstep(env) if lockstep else None
        self.engines = [Engine(env, config, cost, device, self.to_frontends, encoder=True, lockstep=group)
                        for device in devices]
        if api_servers is None:  # one API server per replica, on its device's core when the profile says so
            self.fronts = [Frontend(env, costs, spread, device if on_device else None, mm_workers, latency_s)
                           for device in devices]
        else:
            self.fronts = [Frontend(env, costs, spread, None, mm_workers, latency_s)
                           for _ in range(api_servers)]
        self.next_front = 0  # the API server the next connection goes to
        self.scan_start = 0  # where vLLM's balancer starts its scan

    def to_frontends(self, sampled: list[Request]) -> None:
        """One step's tokens, each request's through the API server it came in by."""
        by_front: dict[int, Sampled] = {}
        for r in sampled:
            by_front.setdefault(id(r.frontend), []).append((r, r.generated))
        for group in by_front.values():
            front = group[0][0].frontend
            front.stream(group, lambda s, f=front: self.finish(s, f))

    def finish(self, sampled: Sampled, front: Frontend) -> None:
        for r, count in sampled:
            if count >= r.output_tokens:
                front.outstanding -= 1
        self.client.receive(sampled)

    def start(self, r: Request) -> None:
        if self.api_servers is None:
            engine = _least_outstanding(self.engines)
            engine.outstanding += 1
            r.frontend = self.fronts[self.engines.index(engine)]
            r.frontend.outstanding += 1
            r.frontend.take(r, engine.add)
            return
        r.frontend = self.fronts[self.next_front % len(self.fronts)]  # the kernel spreads connections over them
        self.next_front += 1
        r.frontend.outstanding += 1
        r.frontend.take(r, self.to_engine)

    def to_engine(self, request: Request) -> None:
        """vLLM's data-parallel balancer: the engine of lowest load score, its scan's start rotating (ties go
        round robin)."""
        start = self.scan_start = (self.scan_start + 1) % len(self.engines)
        engine = min(self.engines[start:] + self.engines[:start], key=lambda e: e.load_score)
        engine.outstanding += 1
        engine.add(request)

    def run(self) -> Result:
        self.env.process(_arrivals(self.env, self.workload, self.requests, self.start, self.client.finished))
        self.env.run()
        fronts_busy = sum(f.busy_s for f in self.fronts)
        return Result("coupled", 0, self.replicas, self.requests,
                      {"language": sum(e.busy_s for e in self.engines), "api_server": fronts_busy},
                      {"language": self.replicas, "api_server": len(self.fronts)})


class VisionServer:
    """Encoder sequences (tiles) of all waiting images batched across requests under a budget, round-robin
    between images (as vision_server.scheduler does); a batch leaves when full or when its oldest sequence
    waited `max_batch_wait_s`; an image's features leave when its own last sequence is done."""

    def __init__(self, env: simpy.Environment, profiles: StageProfiles, on_image_done, device: Device,
                 roofline: Roofline | None):
        self.env, self.profiles, self.on_image_done, self.roofline = env, profiles, on_image_done, roofline
        self.images: list[list] = []  # [request, image index, sequences to schedule, left to finish, enqueued at]
        self.outstanding = 0
        self.busy_s = 0.0
        # the encoder's device: shared with preprocessing on CPU, and with any server placed on it
        self.device = device
        self._wake = env.event()
        env.process(self._loop())

    @property
    def waiting_tiles(self) -> int:
        return sum(len(entry[2]) for entry in self.images)

    def submit(self, request: Request, image: int) -> None:
        sequences = list(request.sequences[image])
        self.images.append([request, image, sequences, len(sequences), self.env.now])
        if not self._wake.triggered:
            self._wake.succeed()

    def _seconds(self, batch: list[int]) -> float:
        if self.roofline is not None:
            return self.roofline.vision_seconds(batch)
        return self.profiles.vision.batch_seconds(len(batch))

    def _loop(self):
        vision = self.profiles.vision
        while True:
            while not self.images:
                self._wake = self.env.event()
                yield self._wake
            deadline = min(entry[4] for entry in self.images) + vision.max_batch_wait_s
            while self.waiting_tiles < vision.max_batch_tiles and self.env.now < deadline:
                self._wake = self.env.event()
                yield self._wake | self.env.timeout(deadline - self.env.now)
            batch: list[list] = []
            patches: list[int] = []
            while len(batch) < vision.max_batch_tiles and any(entry[2] for entry in self.images):
                for entry in self.images:  # one sequence per image per round
                    if entry[2] and len(batch) < vision.max_batch_tiles:
                        patches.append(entry[2].pop())
                        batch.append(entry)
            self.images = [entry for entry in self.images if entry[2]]
            seconds = self._seconds(patches)
            self.busy_s += seconds
            yield from self.device.run(seconds)
            for entry in batch:
                entry[3] -= 1
                if entry[3] == 0:
                    self.on_image_done(entry[0], entry[1])


def simulate_dvd(profiles: StageProfiles, workload: Workload, vision_servers: int, language_servers: int,
                 devices: list[int] | None = None, *, spread_images: bool = False,
                 prefill_as_features_arrive: bool = False) -> Result:
    """`devices`: the device each server runs on, vision servers first (default: a device each). Servers
    placed on one device take turns on it, step by step (CPU cores shared by processes, a GPU shared).

    Two techniques peers use, off by default (DvD today): `spread_images` sends each image of a request to the
    least busy vision server instead of the whole request to one; `prefill_as_features_arrive` admits a request
    when its Generate call arrives and prefills up to the first image whose features are still on their way."""
    servers = vision_servers + language_servers
    devices = list(range(servers)) if devices is None else devices
    if len(devices) != servers:
        raise ValueError(f"devices names {len(devices)} servers' devices, the split has {servers} servers")
    return DvdRun(profiles, workload, vision_servers, devices, spread_images, prefill_as_features_arrive).run()


class DvdRun:
    """One simulated DvD run (`simulate_dvd`): gateways, vision servers, language servers with their front ends
    and feature links, and a request's way through them. A request goes to the gateway (`start`), which sends
    its images to a vision server and its Generate call to a language server (`dispatch`); each encoded image's
    features cross the language server's link (`transfer`), and the request is prefilled once its Generate call
    and its features are in (`maybe_ready`)."""

    def __init__(self, profiles: StageProfiles, workload: Workload, vision_servers: int, devices: list[int],
                 spread_images: bool, prefill_as_features_arrive: bool):
        self.profiles, self.workload = profiles, workload
        self.spread_images, self.prefill_early = spread_images, prefill_as_features_arrive
        self.env = env = simpy.Environment()
        shared = dict(zip(sorted(set(devices)), devices_for(env, profiles, workload, len(set(devices)))))
        self.requests = make_requests(workload, profiles)
        self.client = Client(env)
        spread = Spread(profiles.service_time_cv, workload.seed)
        language_servers = len(devices) - vision_servers
        # gateway processes: the profile's count, or one per language server (stateless replicas behind a balancer)
        self.gateways = [Frontend(env, profiles.gateway, spread)
                         for _ in range(profiles.gateway.processes or language_servers)] if profiles.gateway else []
        self.languages, self.fronts = self._language_servers([shared[d] for d in devices[vision_servers:]], spread)
        self.links = {id(engine): simpy.Resource(env, capacity=1) for engine in self.languages}  # one receive link each
        self.route: dict[int, Engine] = {}  # request -> its language server
        self.vision_route: dict = {}  # request (or (request, image) when spreading images) -> its vision server
        self.wire_busy_s = 0.0
        self.arrived: dict[tuple[int, int], bool] = {}  # (request, image) -> its features are in
        roofline = profiles.roofline
        vision_roofline = roofline.model_copy(update={"tensor_parallel": 1}) if roofline else None
        self.visions = [VisionServer(env, profiles, self.image_done, shared[devices[i]], vision_roofline)
                        for i in range(vision_servers)]
        # image decoding and tiling: the server's worker threads, on its own device's cores (CPU) or on the host's
        self.workers = {id(v): simpy.Resource(env, capacity=profiles.vision.preprocess_parallelism)
                        for v in self.visions}
        self.host = None if profiles.vision.preprocess_on_device else Host(env, profiles, workload)
        self.next_gateway = 0

    def _language_servers(self, devices: list[Device], spread: Spread) -> tuple[list[Engine], dict[int, Frontend]]:
        """One engine per device (vLLM without the encoder), each with its server's front end."""
        profiles = self.profiles
        front_costs = profiles.language_frontend or FrontendCosts()
        front_latency = 0.0 if profiles.language_frontend else profiles.language.overhead_s_per_request
        config = engine_config(profiles, profiles.roofline, vision_weights=False)
        cost = step_cost(profiles)
        engines, fronts = [], {}
        for device in devices:
            engine = Engine(self.env, config, cost, device, self.language_output, encoder=False)
            fronts[id(engine)] = Frontend(self.env, front_costs, spread, latency_s=front_latency)
            engines.append(engine)
        return engines, fronts

    def language_output(self, sampled: list[Request]) -> None:
        """One step's tokens through each request's language front end, then its gateway, to the client."""
        for front in {id(r.frontend): r.frontend for r in sampled}.values():
            group = [(r, r.generated) for r in sampled if r.frontend is front]
            if self.gateways:
                _relay(front, group, "gateway", self.client.receive)
            else:
                front.stream(group, self.client.receive)

    def start(self, r: Request) -> None:
        """A request reaches a gateway (in turn), or goes straight on without one."""
        if self.gateways:
            r.gateway = self.gateways[self.next_gateway % len(self.gateways)]
            self.next_gateway += 1
            r.gateway.take(r, self.dispatch)
        else:
            self.dispatch(r)

    def dispatch(self, r: Request) -> None:
        """The gateway's routing: the language server and vision server(s) with the fewest requests in flight."""
        engine = _least_outstanding(self.languages)
        engine.outstanding += 1
        self.route[r.index] = engine
        r.frontend = self.fronts[id(engine)]
        r.images_left = len(r.sequences)
        if r.sequences and self.spread_images:
            for image in range(len(r.sequences)):
                server = self.vision_route[(r.index, image)] = _least_outstanding(self.visions)
                server.outstanding += 1
                self.env.process(self.encode(r, server, [image]))
        elif r.sequences:
            server = self.vision_route[r.index] = _least_outstanding(self.visions)
            server.outstanding += 1
            self.env.process(self.encode(r, server, range(len(r.sequences))))
        r.frontend.take(r, self.generate_arrived)

    def encode(self, r: Request, server: VisionServer, images):
        yield self.env.timeout(self.profiles.vision.overhead_s_per_request)
        for image in images:  # decode and tiling in the server's threads, then into the scheduler
            self.env.process(self.preprocess(r, image, server))

    def preprocess(self, r: Request, image: int, server: VisionServer):
        with self.workers[id(server)].request() as worker:
            yield worker
            seconds = len(r.sequences[image]) * self.profiles.vision.preprocess_s_per_tile
            yield from (self.host or server.device).run(seconds)
        server.submit(r, image)

    def image_done(self, r: Request, image: int) -> None:
        r.images_encoded += 1
        server = self.vision_route[(r.index, image)] if self.spread_images else self.vision_route[r.index]
        if self.spread_images or r.images_encoded == len(r.sequences):  # the gateway balances on work being encoded
            server.outstanding -= 1
        self.env.process(self.transfer(r, image))

    def transfer(self, r: Request, image: int):
        """One image's features over its language server's link, one transfer at a time."""
        engine = self.route[r.index]
        seconds = self.profiles.transport.seconds(self.profiles.feature_bytes(r.image_tokens[image]))
        with self.links[id(engine)].request() as slot:
            yield slot
            self.wire_busy_s += seconds
            yield self.env.timeout(seconds)
        r.images_left -= 1
        self.arrived[(r.index, image)] = True
        if r.items:
            r.items[image].encoded = True
        self.maybe_ready(r)

    def generate_arrived(self, r: Request) -> None:
        r.generate_arrived = True
        if self.prefill_early:
            r.layout(encoded=False)
            for image, item in enumerate(r.items):
                item.encoded = self.arrived.get((r.index, image), False)
            self.route[r.index].add(r)
        else:
            self.maybe_ready(r)

    def maybe_ready(self, r: Request) -> None:
        if self.prefill_early:  # admitted on its Generate call: its prefill may now go past this image
            self.route[r.index].wake()
        elif r.generate_arrived and r.images_left == 0:
            self.route[r.index].add(r)

    def run(self) -> Result:
        self.env.process(_arrivals(self.env, self.workload, self.requests, self.start, self.client.finished))
        self.env.run()
        vision_servers, language_servers = len(self.visions), len(self.languages)
        busy_s = {"vision": sum(v.busy_s for v in self.visions), "language": sum(e.busy_s for e in self.languages),
                  "wire": self.wire_busy_s, "language_frontend": sum(f.busy_s for f in self.fronts.values())}
        counts = {"vision": vision_servers, "language": language_servers, "wire": language_servers,
                  "language_frontend": language_servers}
        if self.gateways:
            busy_s["gateway"], counts["gateway"] = sum(g.busy_s for g in self.gateways), len(self.gateways)
        return Result("dvd", vision_servers, language_servers, self.requests, busy_s, counts)


def simulate_epd(profiles: StageProfiles, workload: Workload, encoders: int, language_servers: int,
                 proxy: FrontendCosts, encoder_scheduler: SchedulerConfig, language_eager: bool = False,
                 language_scheduler: SchedulerConfig | None = None, encoder_text_tokens: int = 10) -> Result:
    """vLLM's encoder disaggregation as its example deploys it (`examples/online_serving/disaggregated_encoder/`):
    a proxy (`disagg_epd_proxy.py`, `fanout_encoder_primer`) sends one request per image, its text removed and
    max_tokens 1, round robin to encoder-only vLLM instances (an EC producer runs no language model:
    `vllm/config/vllm.py`, `_resolve_mm_encoder_only`), waits for all of them, then forwards the original request
    to a prefill/decode instance, whose API server processes the images again and whose scheduler loads their
    features through the EC connector instead of encoding them. Every instance is one `vllm serve` with its own
    API server (`profiles.api_server`)."""
    if profiles.roofline is None or profiles.api_server is None:
        raise ValueError("simulate_epd needs a derived profile (roofline and API server costs)")
    return EpdRun(profiles, workload, encoders, language_servers, proxy, encoder_scheduler, language_eager,
                  language_scheduler, encoder_text_tokens).run()


class EpdRun:
    """One simulated run of vLLM's encoder disaggregation (`simulate_epd`): the proxy, the encoder instances and
    the prefill/decode instances, each with its API server, and a request's way through them."""

    def __init__(self, profiles: StageProfiles, workload: Workload, encoders: int, language_servers: int,
                 proxy: FrontendCosts, encoder_scheduler: SchedulerConfig, language_eager: bool,
                 language_scheduler: SchedulerConfig | None, encoder_text_tokens: int):
        self.profiles, self.workload, self.encoder_text_tokens = profiles, workload, encoder_text_tokens
        self.env = env = simpy.Environment()
        self.requests = make_requests(workload, profiles)
        self.client = Client(env)
        spread = Spread(profiles.service_time_cv, workload.seed)
        api = profiles.api_server.model_copy(update={"processes": 1})
        self.proxy = Frontend(env, proxy, spread)
        vision_roofline = profiles.roofline.model_copy(update={"tensor_parallel": 1})
        language_roofline = profiles.roofline.model_copy(update={"cuda_graphs": not language_eager})
        devices = devices_for(env, profiles, workload, encoders + language_servers, exclusive=True)
        self.pending: dict[int, list] = {}  # encoder request index -> [the original request, images left]
        self.wire_busy_s = 0.0
        encoder_cost = step_cost(profiles, vision_roofline, language=False)
        self.e_engines, self.e_fronts = [], []
        for i in range(encoders):
            self.e_engines.append(Engine(env, encoder_scheduler, encoder_cost, devices[i], self.encoded, encoder=True))
            self.e_fronts.append(Frontend(env, api, spread))
        config = engine_config(profiles.model_copy(update={"scheduler": language_scheduler or profiles.scheduler}),
                               language_roofline, vision_weights=False)
        language_cost = step_cost(profiles, language_roofline)
        self.pd_engines, self.pd_fronts = [], []
        for i in range(language_servers):
            self.pd_engines.append(Engine(env, config, language_cost, devices[encoders + i], self.language_output,
                                          encoder=False))
            self.pd_fronts.append(Frontend(env, api, spread))
        self.next_encoder = 0

    def start(self, r: Request) -> None:
        r.gateway = self.proxy
        self.proxy.take(r, self.to_encoder)

    def to_encoder(self, r: Request) -> None:
        """The proxy's fan-out: one request per image, its text removed, round robin over the encoders."""
        if not r.sequences:
            self.env.process(self.to_language(r))
            return
        self.pending[r.index] = [r, len(r.sequences)]
        for image in range(len(r.sequences)):
            e = Request(r.index, r.arrival, [r.sequences[image]], [r.image_tokens[image]], self.encoder_text_tokens,
                        1)
            i = self.next_encoder % len(self.e_engines)
            self.next_encoder += 1
            e.frontend = self.e_fronts[i]
            e.frontend.outstanding += 1
            e.frontend.take(e, self.e_engines[i].add)

    def encoded(self, sampled: list[Request]) -> None:
        for e in sampled:
            e.frontend.outstanding -= 1
            entry = self.pending[e.index]
            entry[1] -= 1
            if entry[1] == 0:  # the proxy waits for every image's encode request
                del self.pending[e.index]
                self.env.process(self.to_language(entry[0]))

    def to_language(self, r: Request):
        seconds = sum(self.profiles.transport.seconds(self.profiles.feature_bytes(t)) for t in r.image_tokens)
        self.wire_busy_s += seconds
        yield self.env.timeout(seconds)  # the EC connector's save and load of every image's features
        i = min(range(len(self.pd_engines)), key=lambda k: self.pd_engines[k].outstanding)
        self.pd_engines[i].outstanding += 1
        r.frontend = self.pd_fronts[i]
        r.frontend.take(r, self.pd_engines[i].add)

    def language_output(self, sampled: list[Request]) -> None:
        for front in {id(r.frontend): r.frontend for r in sampled}.values():
            group = [(r, r.generated) for r in sampled if r.frontend is front]
            _relay(front, group, "gateway", self.client.receive)

    def run(self) -> Result:
        self.env.process(_arrivals(self.env, self.workload, self.requests, self.start, self.client.finished))
        self.env.run()
        encoders, language_servers = len(self.e_engines), len(self.pd_engines)
        return Result("epd", encoders, language_servers, self.requests,
                      {"vision": sum(e.busy_s for e in self.e_engines),
                       "language": sum(e.busy_s for e in self.pd_engines),
                       "wire": self.wire_busy_s, "proxy": self.proxy.busy_s,
                       "encoder_api_server": sum(f.busy_s for f in self.e_fronts),
                       "language_api_server": sum(f.busy_s for f in self.pd_fronts)},
                      {"vision": encoders, "language": language_servers, "wire": language_servers, "proxy": 1,
                       "encoder_api_server": encoders, "language_api_server": language_servers})


def pool_loads(profiles: StageProfiles, workload: Workload, rate: float, vision_servers: int,
               language_servers: int) -> dict[str, float]:
    """Each DvD pool's demand over its best-case capacity at `rate` requests/s (1.0 = saturated).

    Best case: full vision batches, full decode batches; the pool with the highest load is the bottleneck.
    """
    tiles = mean(workload.images_per_request) * mean(workload.tiles_per_image)
    geometry = profiles.geometry
    tokens_per_tile = (workload.vir_compressed_share * geometry.compressed_tokens_per_tile
                       + (1 - workload.vir_compressed_share) * geometry.tokens_per_tile)
    image_tokens = tiles * tokens_per_tile
    prompt = mean(workload.text_tokens) + image_tokens
    output = mean(workload.output_tokens)
    vision = profiles.vision
    vision_s = tiles * vision.batch_seconds(vision.max_batch_tiles) / vision.max_batch_tiles
    language = profiles.language
    batch = language.max_num_seqs
    language_s = (language.prefill_seconds([round(prompt)] * batch) / batch
                  + output * language.decode_step_seconds(batch, prompt + output / 2) / batch)
    wire_s = profiles.transport.seconds(profiles.feature_bytes(round(image_tokens))) if tiles else 0.0
    return {"vision": rate * vision_s / max(1, vision_servers),
            "wire": rate * wire_s / language_servers,
            "language": rate * language_s / language_servers}
