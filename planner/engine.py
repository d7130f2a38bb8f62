"""vLLM's V1 engine core, simulated step by step: its scheduler deciding what one step computes, one forward per
step that every scheduled request waits for.

Each mechanism is vLLM 0.32's, from the file named:

- `vllm/v1/core/sched/scheduler.py` (`Scheduler.schedule`): no prefill or decode phase; the RUNNING requests
  are served first, in order, each asking for the tokens it lacks (a whole remaining prompt chunk, or one decode
  token), capped by the step's token budget `max_num_batched_tokens` (and `long_prefill_token_threshold`); then
  the WAITING requests, first come first served, while budget and `max_num_seqs` allow. A waiting prompt that
  does not fit the budget waits when chunked prefill is off; with it on it is cut to the budget.
- `_try_schedule_encoder_inputs` (same file): an image is encoded in the step whose chunk first touches its
  placeholder tokens, all of it at once, if the step's encoder compute budget and the encoder cache have room;
  otherwise the chunk stops just before the image.
- `vllm/v1/core/encoder_cache_manager.py` (`compute_mm_encoder_budget`): compute budget and cache size are
  `max(max_num_batched_tokens, largest item's tokens)`; an image's entry is freed once the prefill has passed it.
- `vllm/v1/worker/gpu_model_runner.py` (`execute_model`): the step runs the scheduled encoder inputs
  (`_execute_mm_encoder`), then one forward of every scheduled prefill chunk and decode token; a request's
  first token is sampled in the step that computes its last prompt token.
- `vllm/config/vllm.py`: async scheduling (the default where supported) overlaps the host's work for the next
  step with the device's work for this one, so a step costs the longer of the two, not their sum.
- KV cache: a request is admitted only when the cache holds its prompt and output (`kv_cache_manager.py`
  allocates blocks as tokens are scheduled; this takes the whole request at admission, so nothing is preempted).
- `vllm/v1/engine/core.py` (`DPEngineCoreProc`) and `vllm/v1/worker/dp_utils.py`: a data-parallel group whose
  ranks step together (`Lockstep`): a mixture-of-experts model's under `--data-parallel-size`, and in vLLM 0.12
  every model's.

A DvD language server runs the same scheduler without an encoder: its images' features arrive from a vision
server and are in place before the request is admitted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy
from pydantic import BaseModel, Field

from planner.roofline import StepShape


@dataclass
class Item:
    """One image in a prompt: its placeholder tokens and the encoder sequences (patch counts) that make them."""

    offset: int  # first placeholder token in the prompt
    tokens: int
    sequences: list[int]
    encoded: bool = False  # features in the engine's encoder cache (or delivered by a vision server)
    cached: bool = False  # holding encoder-cache space


@dataclass
class Request:
    index: int
    arrival: float
    sequences: list[list[int]]  # per image: patch tokens of each encoder sequence (tiles, or the whole image)
    image_tokens: list[int]  # per image: language tokens of its features (ViR makes some tiles 64)
    text_tokens: int
    output_tokens: int
    images_first: bool = True
    first_token: float | None = None
    finish: float | None = None
    generated: int = 0
    computed: int = 0  # prompt tokens computed so far
    items: list[Item] = field(default_factory=list)
    # DvD's path: features still on their way, and whether the Generate call has reached the language server
    images_left: int = 0
    images_encoded: int = 0
    generate_arrived: bool = False
    frontend: object = field(default=None, repr=False)  # the front-end process that streams its tokens
    gateway: object = field(default=None, repr=False)  # DvD: the gateway process it came through

    @property
    def tiles(self) -> list[int]:
        """Encoder sequences per image (InternVL's tiles; one per image at native resolution)."""
        return [len(s) for s in self.sequences]

    def __post_init__(self) -> None:
        self.prompt_tokens = self.text_tokens + sum(self.image_tokens) + IMAGE_MARKER_TOKENS * len(self.sequences)

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / max(1, self.output_tokens - 1)

    def layout(self, encoded: bool) -> None:
        """Place the images in the prompt (before or after the text, each between two marker tokens)."""
        at = 0 if self.images_first else self.text_tokens
        self.items = []
        for tokens, sequences in zip(self.image_tokens, self.sequences):
            self.items.append(Item(at + 1, tokens, sequences, encoded=encoded))
            at += tokens + IMAGE_MARKER_TOKENS


IMAGE_MARKER_TOKENS = 2  # <img> and </img> (or <|vision_start|> and <|vision_end|>) around each image


class SchedulerConfig(BaseModel):
    """vLLM's scheduler settings, under vLLM's names; defaults are `vllm serve`'s on an H100/H200-class GPU
    (`vllm/engine/arg_utils.py`, `get_batch_defaults`: 8192 tokens and 1024 sequences; an A100 gets 2048 and 256)."""

    max_num_batched_tokens: int = Field(8192, gt=0)
    max_num_seqs: int = Field(1024, gt=0)
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = Field(0, ge=0)
    encoder_compute_budget: int | None = Field(None, gt=0)  # tokens; None: vLLM's rule from the largest item
    encoder_cache_size: int | None = Field(None, gt=0)
    max_item_tokens: int = Field(0, ge=0)  # the model's largest image, for vLLM's budget rule
    kv_cache_tokens: int | None = Field(None, gt=0)  # None: never the limit
    async_scheduling: bool = True

    def encoder_budgets(self) -> tuple[int, int]:
        """(compute budget per step, cache size), both in tokens: `compute_mm_encoder_budget`'s rule."""
        floor = max(self.max_num_batched_tokens, self.max_item_tokens)
        return self.encoder_compute_budget or floor, self.encoder_cache_size or floor


# What a step costs: (the step's language-model shape, the encoder sequences it runs) -> (device s, host s).
StepCost = Callable[[StepShape, list[int]], tuple[float, float]]


@dataclass
class Scheduled:
    request: Request
    tokens: int
    items: list[Item]


class Engine:
    """One engine core on one device (or tensor-parallel group), fed requests by `add`."""

    def __init__(self, env: simpy.Environment, config: SchedulerConfig, cost: StepCost, device,
                 on_output: Callable[[list[Request]], None], encoder: bool, lockstep: Lockstep | None = None):
        """`on_output` gets each step's requests that sampled a token (`generated` counts them); `encoder`: the
        engine runs the vision encoder in its steps (coupled serving), else features come in ready. `lockstep`:
        the data-parallel group whose steps this engine's steps are (it then runs no loop of its own)."""
        self.env, self.config, self.cost, self.device = env, config, cost, device
        self.on_output, self.encoder = on_output, encoder
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.outstanding = 0  # requests routed here and not finished (the router's view)
        self.busy_s = 0.0  # device seconds (a step's host time beyond them is not the device working)
        self.steps = 0
        self.kv_used = 0
        self.encoder_cache_used = 0
        self.compute_budget, self.cache_size = config.encoder_budgets()
        self._wake = env.event()
        self.lockstep = lockstep
        if lockstep is None:
            env.process(self._loop())
        else:
            lockstep.engines.append(self)

    def add(self, request: Request) -> None:
        """Queue a request. Its images are laid out in its prompt unless the caller did (DvD's features arriving
        one by one); without an encoder, an image whose features are not in yet stops the prefill before it."""
        if not request.items:
            request.layout(encoded=not self.encoder)
        self.waiting.append(request)
        self.wake()

    def wake(self) -> None:
        """Something changed that may let a step schedule more (an arrival, features in, a finish)."""
        if self.lockstep is not None:
            self.lockstep.wake()
        elif not self._wake.triggered:
            self._wake.succeed()

    @property
    def load_score(self) -> int:
        """vLLM 0.32's data-parallel balancer picks the engine with the fewest requests in flight (waiting +
        running; waiting ones weigh more only when the KV cache is over half full), ties rotating
        (`vllm/v1/engine/core_client.py`, `DPLBAsyncMPClient.get_core_engine_for_request`)."""
        return len(self.waiting) + len(self.running)

    def _encoder_inputs(self, r: Request, tokens: int, budget: list[int]) -> tuple[int, list[Item]]:
        """`_try_schedule_encoder_inputs`: the images this chunk touches, or a chunk cut before one that does
        not fit the compute budget or the cache. `budget` is [compute left, cache left], updated."""
        end = r.computed + tokens
        chosen: list[Item] = []
        for item in r.items:
            if item.encoded or item.offset >= end or item.offset + item.tokens <= r.computed:
                continue
            if item.tokens > budget[0] or item.tokens > budget[1]:
                return (item.offset - r.computed if r.computed < item.offset else 0), chosen
            budget[0] -= item.tokens
            budget[1] -= item.tokens
            chosen.append(item)
        return tokens, chosen

    def _chunk(self, r: Request, token_budget: int, budget: list[int]) -> tuple[int, list[Item]]:
        lacking = r.prompt_tokens - r.computed if r.computed < r.prompt_tokens else 1
        threshold = self.config.long_prefill_token_threshold
        if 0 < threshold < lacking and len(self.running) + len(self.waiting) > 1:
            lacking = threshold
        tokens = min(lacking, token_budget)
        if r.computed >= r.prompt_tokens:
            return tokens, []
        if not self.encoder:  # features come from elsewhere: the chunk stops before any still on its way
            waiting = [item.offset for item in r.items if not item.encoded and item.offset < r.computed + tokens]
            return (min(waiting) - r.computed if waiting else tokens), []
        return self._encoder_inputs(r, tokens, budget)

    def schedule(self) -> list[Scheduled]:
        """One call of vLLM's `Scheduler.schedule`: running requests first, then waiting ones."""
        config, token_budget = self.config, self.config.max_num_batched_tokens
        budget = [self.compute_budget, self.cache_size - self.encoder_cache_used]
        plan: list[Scheduled] = []
        for r in self.running:
            if token_budget <= 0:
                break
            tokens, items = self._chunk(r, token_budget, budget)
            if tokens:
                plan.append(Scheduled(r, tokens, items))
                token_budget -= tokens
        while self.waiting and token_budget > 0 and len(self.running) < config.max_num_seqs:
            r = self.waiting[0]
            if not config.enable_chunked_prefill and r.prompt_tokens > token_budget:
                break
            need = r.prompt_tokens + r.output_tokens
            if config.kv_cache_tokens and self.kv_used + need > config.kv_cache_tokens:
                if not self.running:
                    raise ValueError(f"a request of {need} tokens does not fit the KV cache's "
                                     f"{config.kv_cache_tokens} tokens")
                break
            tokens, items = self._chunk(r, token_budget, budget)
            if not tokens:
                break
            self.waiting.popleft()
            self.running.append(r)
            self.kv_used += need
            plan.append(Scheduled(r, tokens, items))
            token_budget -= tokens
        for s in plan:
            for item in s.items:
                item.cached = True
                self.encoder_cache_used += item.tokens
        return plan

    def next_step(self) -> tuple[list[Scheduled], StepShape, list[int]]:
        """Schedule one step: its plan, the language model's shape and the encoder sequences it runs."""
        plan = self.schedule()
        shape = StepShape()
        for s in plan:
            r = s.request
            shape.add_chunk(s.tokens, r.computed + r.generated, decode=r.computed >= r.prompt_tokens)
        return plan, shape, [seq for s in plan for item in s.items for seq in item.sequences]

    def count_step(self, device_s: float, host_s: float) -> float:
        """Count a step and its device time; returns its wall time: the longer of host and device work under async
        scheduling, else their sum."""
        self.busy_s += device_s
        self.steps += 1
        return max(device_s, host_s) if self.config.async_scheduling else device_s + host_s

    def _loop(self):
        while True:
            if not self.waiting and not self.running:
                self._wake = self.env.event()
                yield self._wake
            plan, shape, encoder_sequences = self.next_step()
            if not plan:  # nothing fits (KV cache full, features on their way): wait for a finish or an arrival
                self._wake = self.env.event()
                yield self._wake
                continue
            yield from self.device.run(self.count_step(*self.cost(shape, encoder_sequences)))
            self.finish_step(plan)

    def finish_step(self, plan: list[Scheduled]) -> None:
        """The step's outputs: computed tokens, freed encoder cache, first and decode tokens, finished requests."""
        sampled: list[Request] = []
        for s in plan:
            r = s.request
            for item in s.items:
                item.encoded = True
            if r.computed < r.prompt_tokens:
                r.computed += s.tokens
            for item in r.items:
                if item.cached and item.offset + item.tokens <= r.computed:
                    item.cached = False
                    self.encoder_cache_used -= item.tokens
            if r.computed < r.prompt_tokens:
                continue  # a prefill chunk short of the prompt's end samples nothing
            r.generated += 1
            sampled.append(r)
        finished = [r for r in sampled if r.generated >= r.output_tokens]
        if finished:
            done = set(map(id, finished))
            self.running = [r for r in self.running if id(r) not in done]
            for r in finished:
                self.kv_used -= r.prompt_tokens + r.output_tokens
                self.outstanding -= 1
            self.wake()
        self.on_output(sampled)


class Lockstep:
    """Data-parallel ranks whose every step is one step of all of them: vLLM's `DPEngineCoreProc`.

    Each step every rank all-reduces its token count before its forward (`vllm/v1/worker/dp_utils.py`,
    `coordinate_batch_across_dp`, called from `gpu_model_runner.py`'s `execute_model`), pads its forward to the
    largest count when CUDA graphs are on, and runs its own encoder inputs; a rank with nothing scheduled runs a
    dummy batch while any rank has work (`vllm/v1/engine/core.py`, `DPEngineCoreProc.run_busy_loop`). So a step
    lasts as long as the slowest rank's, and one rank's prefill stalls every rank's decodes.

    vLLM 0.12 did this for every model under `--data-parallel-size`; since vllm-project/vllm#30739 (after 0.12)
    only a mixture-of-experts model's ranks do, a dense model's running as independent engines.
    """

    def __init__(self, env: simpy.Environment):
        self.env = env
        self.engines: list[Engine] = []
        self._wake = env.event()
        env.process(self._loop())

    def wake(self) -> None:
        if not self._wake.triggered:
            self._wake.succeed()

    def _loop(self):
        env = self.env
        while True:
            steps = [(engine, *engine.next_step()) for engine in self.engines]
            if not any(plan for _, plan, _, _ in steps):
                self._wake = env.event()
                yield self._wake
                continue
            language_s = [engine.cost(shape, [])[0] for engine, _, shape, _ in steps]
            padded_s = max(language_s)  # every rank's forward is padded to the largest rank's tokens
            runs = []
            for (engine, _, shape, sequences), own_s in zip(steps, language_s):
                device_s, host_s = engine.cost(shape, sequences)
                runs.append(env.process(engine.device.run(engine.count_step(device_s + padded_s - own_s, host_s))))
            yield env.all_of(runs)
            for engine, plan, _, _ in steps:
                if plan:
                    engine.finish_step(plan)
