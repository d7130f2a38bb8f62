"""Discrete-event simulation of DvD and of coupled serving on the same devices, fed by stage profiles.

Why simulation (simpy) and not a queueing formula: the stages interact in ways closed forms miss —
a vision server waits up to `max_batch_wait_s` to fill a batch, so its speed depends on the load; a
language server batches continuously, so a request's decode step costs what the other requests in
flight make it cost; a request needs every image's features before its prefill, so it waits for the
slowest of several parallel encodes; and in coupled serving the encoder runs inside the engine's step,
stalling every decode in flight. simpy (processes, events, resources) expresses those directly and
keeps the event loop out of this code; an M/D/1 case checks it against the closed form in the tests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import simpy

from planner.profiles import StageProfiles
from planner.workload import Workload, draw, mean

IMAGE_MARKER_TOKENS = 2  # <img> and </img> around each image's features


@dataclass
class Request:
    index: int
    arrival: float
    tiles: list[int]  # per image
    image_tokens: list[int]  # per image (ViR makes some tiles 64 tokens)
    text_tokens: int
    output_tokens: int
    first_token: float | None = None
    finish: float | None = None
    generated: int = 0
    images_left: int = 0  # features not yet at the language server
    images_encoded: int = 0
    generate_arrived: bool = False

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + sum(self.image_tokens) + IMAGE_MARKER_TOKENS * len(self.tiles)

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / max(1, self.output_tokens - 1)


@dataclass
class Result:
    """One simulated run: its requests, and how busy each pool was."""

    system: str  # "dvd" or "coupled"
    vision_servers: int
    language_servers: int
    requests: list[Request]
    busy_s: dict[str, float] = field(default_factory=dict)  # pool -> busy seconds, summed over its servers


def make_requests(workload: Workload, profiles: StageProfiles) -> list[Request]:
    """The workload's requests (arrival times set later by the arrival process), the same for every system."""
    rng = np.random.default_rng(workload.seed)
    full, small = profiles.geometry.tokens_per_tile, profiles.geometry.compressed_tokens_per_tile
    requests = []
    for i in range(workload.requests):
        tiles = [draw(workload.tiles_per_image, rng) for _ in range(draw(workload.images_per_request, rng))]
        tokens = []
        for n in tiles:
            compressed = int(rng.binomial(n, workload.vir_compressed_share)) if workload.vir_compressed_share else 0
            tokens.append(compressed * small + (n - compressed) * full)
        requests.append(Request(i, 0.0, tiles, tokens, draw(workload.text_tokens, rng),
                                draw(workload.output_tokens, rng)))
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
    """One device, shared by the servers placed on it and by a server's own threads.

    Jobs take turns: each runs whole, in arrival order (`timeslice_s` None), or round robin in slices of
    `timeslice_s`, as an OS scheduler shares a CPU core among threads and processes (processor sharing
    as the slice shrinks): a short job beside a long one then finishes early instead of waiting for it.
    """

    def __init__(self, env: simpy.Environment, timeslice_s: float | None, spread: Spread):
        self.env, self.timeslice_s, self.spread = env, timeslice_s, spread
        self._turns = simpy.Resource(env, capacity=1)

    def run(self, seconds: float):
        """A simpy process body: about `seconds` (see `Spread`) of this device, in turns with other jobs."""
        left = self.spread(seconds)
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


def devices_for(env: simpy.Environment, profiles: StageProfiles, workload: Workload, count: int) -> list[Device]:
    spread = Spread(profiles.service_time_cv, workload.seed)
    return [Device(env, profiles.timeslice_s, spread) for _ in range(count)]


class LanguageEngine:
    """A continuously batching engine (vLLM): each step prefills the newly admitted requests and decodes
    one token of every running one. `encode_in_step` adds the coupled engine's encoder to the step."""

    def __init__(self, env: simpy.Environment, profiles: StageProfiles, on_finish, device: Device,
                 encode_in_step: bool = False):
        self.env, self.profiles, self.on_finish = env, profiles, on_finish
        self.device, self.encode_in_step = device, encode_in_step
        self.ready: deque[Request] = deque()
        self.running: list[Request] = []
        self.outstanding = 0
        self.busy_s = 0.0
        self._wake = env.event()
        env.process(self._loop())

    def add(self, request: Request) -> None:
        self.ready.append(request)
        if not self._wake.triggered:
            self._wake.succeed()

    def _loop(self):
        language = self.profiles.language
        while True:
            if not self.ready and not self.running:
                self._wake = self.env.event()
                yield self._wake
            admitted: list[Request] = []
            budget = language.max_batched_tokens or float("inf")
            while self.ready and len(self.running) + len(admitted) < language.max_num_seqs and (
                    not admitted or self.ready[0].prompt_tokens <= budget):  # one long prompt always goes
                budget -= self.ready[0].prompt_tokens
                admitted.append(self.ready.popleft())
            step = 0.0
            if self.running:
                context = sum(r.prompt_tokens + r.generated for r in self.running) / len(self.running)
                step += language.decode_step_seconds(len(self.running), context)
            step += language.prefill_seconds([r.prompt_tokens for r in admitted])
            tiles = sum(sum(r.tiles) for r in admitted) if self.encode_in_step else 0
            if tiles:  # the encoder runs inside the step: every request in flight waits for it
                coupled = self.profiles.coupled
                step += (tiles * coupled.vision_seconds_per_tile if coupled
                         else self.profiles.vision.batch_seconds(tiles))
            self.busy_s += step
            yield from self.device.run(step)
            for r in admitted:
                r.first_token = self.env.now
            self.running.extend(admitted)
            still = []
            for r in self.running:
                r.generated += 1
                if r.generated >= r.output_tokens:
                    r.finish = self.env.now
                    self.outstanding -= 1
                    self.on_finish(r)
                else:
                    still.append(r)
            self.running = still


class VisionServer:
    """Tiles of all waiting images batched across requests under a tile budget, round-robin between images
    (as vision_server.scheduler does); a batch leaves when full or when its oldest tile waited
    `max_batch_wait_s`; an image's features leave when its own last tile is done."""

    def __init__(self, env: simpy.Environment, profiles: StageProfiles, on_image_done, device: Device):
        self.env, self.profiles, self.on_image_done = env, profiles, on_image_done
        self.images: list[list] = []  # [request, image index, tiles to schedule, tiles to finish, enqueued at]
        self.outstanding = 0
        self.busy_s = 0.0
        # the encoder's device: shared with preprocessing on CPU, and with any server placed on it
        self.device = device
        self._wake = env.event()
        env.process(self._loop())

    @property
    def waiting_tiles(self) -> int:
        return sum(entry[2] for entry in self.images)

    def submit(self, request: Request, image: int) -> None:
        self.images.append([request, image, request.tiles[image], request.tiles[image], self.env.now])
        if not self._wake.triggered:
            self._wake.succeed()

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
            while len(batch) < vision.max_batch_tiles and any(entry[2] for entry in self.images):
                for entry in self.images:  # one tile per image per round
                    if entry[2] and len(batch) < vision.max_batch_tiles:
                        entry[2] -= 1
                        batch.append(entry)
            self.images = [entry for entry in self.images if entry[2]]
            seconds = vision.batch_seconds(len(batch))
            self.busy_s += seconds
            yield from self.device.run(seconds)
            for entry in batch:
                entry[3] -= 1
                if entry[3] == 0:
                    self.on_image_done(entry[0], entry[1])


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


def simulate_dvd(profiles: StageProfiles, workload: Workload, vision_servers: int, language_servers: int,
                 devices: list[int] | None = None) -> Result:
    """`devices`: the device each server runs on, vision servers first (default: a device each). Servers
    placed on one device take turns on it, step by step (CPU cores shared by processes, a GPU shared)."""
    servers = vision_servers + language_servers
    devices = list(range(servers)) if devices is None else devices
    if len(devices) != servers:
        raise ValueError(f"devices names {len(devices)} servers' devices, the split has {servers} servers")
    env = simpy.Environment()
    shared = dict(zip(sorted(set(devices)), devices_for(env, profiles, workload, len(set(devices)))))
    requests = make_requests(workload, profiles)
    finished = simpy.Store(env)
    languages = [LanguageEngine(env, profiles, finished.put, shared[devices[vision_servers + i]])
                 for i in range(language_servers)]
    links = {id(engine): simpy.Resource(env, capacity=1) for engine in languages}  # one receive link each
    route: dict[int, LanguageEngine] = {}
    vision_route: dict[int, VisionServer] = {}
    busy = {"wire": 0.0}

    def maybe_ready(r: Request) -> None:
        if r.generate_arrived and r.images_left == 0:
            route[r.index].add(r)

    def transfer(r: Request, image: int):
        engine = route[r.index]
        seconds = profiles.transport.seconds(profiles.feature_bytes(r.image_tokens[image]))
        with links[id(engine)].request() as slot:
            yield slot
            busy["wire"] += seconds
            yield env.timeout(seconds)
        r.images_left -= 1
        maybe_ready(r)

    def image_done(r: Request, image: int) -> None:
        r.images_encoded += 1
        if r.images_encoded == len(r.tiles):  # the gateway balances on requests still being encoded
            vision_route[r.index].outstanding -= 1
        env.process(transfer(r, image))

    visions = [VisionServer(env, profiles, image_done, shared[devices[i]]) for i in range(vision_servers)]
    # image decoding and tiling: the server's worker threads, on its own device's cores (CPU) or on the host's
    workers = {id(v): simpy.Resource(env, capacity=profiles.vision.preprocess_parallelism) for v in visions}
    host = None if profiles.vision.preprocess_on_device else Host(env, profiles, workload)

    def encode(r: Request, server: VisionServer):
        yield env.timeout(profiles.vision.overhead_s_per_request)
        for image in range(len(r.tiles)):  # decode and tiling in the server's threads, then into the scheduler
            env.process(preprocess(r, image, server))

    def preprocess(r: Request, image: int, server: VisionServer):
        with workers[id(server)].request() as worker:
            yield worker
            yield from (host or server.device).run(r.tiles[image] * profiles.vision.preprocess_s_per_tile)
        server.submit(r, image)

    def generate(r: Request):
        yield env.timeout(profiles.language.overhead_s_per_request)
        r.generate_arrived = True
        maybe_ready(r)

    def start(r: Request) -> None:
        engine = _least_outstanding(languages)
        engine.outstanding += 1
        route[r.index] = engine
        r.images_left = len(r.tiles)
        if r.tiles:
            server = vision_route[r.index] = _least_outstanding(visions)
            server.outstanding += 1
            env.process(encode(r, server))
        env.process(generate(r))

    env.process(_arrivals(env, workload, requests, start, finished))
    env.run()
    return Result("dvd", vision_servers, language_servers, requests,
                  {"vision": sum(v.busy_s for v in visions), "language": sum(e.busy_s for e in languages),
                   "wire": busy["wire"]})


def simulate_coupled(profiles: StageProfiles, workload: Workload, replicas: int) -> Result:
    """Data-parallel coupled serving: each device runs encoder and language model in one engine."""
    env = simpy.Environment()
    requests = make_requests(workload, profiles)
    finished = simpy.Store(env)
    engines = [LanguageEngine(env, profiles, finished.put, device, encode_in_step=True)
               for device in devices_for(env, profiles, workload, replicas)]
    measured = profiles.coupled
    # vLLM's input processor: its API server's threads, on the engine's cores (CPU) or on the host's
    parallelism = measured.preprocess_parallelism if measured else profiles.vision.preprocess_parallelism
    workers = {id(e): simpy.Resource(env, capacity=parallelism) for e in engines}
    host = None if measured and measured.preprocess_on_device else Host(env, profiles, workload)
    overhead_s = measured.overhead_s_per_request if measured else profiles.language.overhead_s_per_request
    preprocess_s_per_tile = measured.preprocess_s_per_tile if measured else profiles.vision.preprocess_s_per_tile

    def serve(r: Request, engine: LanguageEngine):
        yield env.timeout(overhead_s)
        with workers[id(engine)].request() as worker:
            yield worker
            yield from (host or engine.device).run(sum(r.tiles) * preprocess_s_per_tile)
        engine.add(r)

    def start(r: Request) -> None:
        engine = _least_outstanding(engines)
        engine.outstanding += 1
        env.process(serve(r, engine))

    env.process(_arrivals(env, workload, requests, start, finished))
    env.run()
    return Result("coupled", 0, replicas, requests, {"language": sum(e.busy_s for e in engines)})


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
