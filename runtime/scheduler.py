"""The serving engine: one thread owns the model's sessions and runs every request's sequences together.

    submit(job) ─► waiting ─► admitted (KV slots assigned, cached prefix found) ─► prefill work ─► decoding ─► done

A request's `n` choices are `Sequence`s: each owns a KV slot (a row of the `Slab`), its length, its position
offset, its sampler, grammar and text state (`ChoiceText`). Each iteration of the loop:

1. drops cancelled requests (their slots are free at once) and admits waiting ones, first come first served,
   while `max_batch` slots allow;
2. runs at most one bounded unit of prefill work for one admitted request: one vision encoder run (a tile), or
   one chunk of at most `PREFILL_CHUNK` prompt tokens. While other sequences are decoding, prefill gets at most `PREFILL_SHARE` of
   the engine's time (time spent on it is paid back by decode steps before the next unit), so a long image prompt
   slows running streams by a bounded factor instead of freezing them; the request with the least prefill work
   left goes first, and one with at most `SMALL_PREFILL` text tokens left runs at once, so a short request is not
   stuck behind a long one;
3. runs one batched decode step over every decoding sequence: one decoder run over one contiguous range of slab
   rows, each row at its own length. Every row in a run costs a full row of every matmul (~3 ms at SmolVLM-256M
   int4 size), so a run covers only decoding rows: a lone sequence (or any set whose rows are contiguous) runs
   where it is; when the set is not contiguous (a sequence finished between two others, a prefill done in a far
   slot) the decoding rows move to [0, d): a row above a free or prefilling one swaps places with it, a copy of
   the two rows' positions within the slab, once per change, never per step (a swap copies the cached prefix of
   the other row too: 50-100 MB and 10-20 ms at 1-2k positions, which a lone stream no longer pays);
4. samples each row, feeds its `ChoiceText`, emits a `Step`; finished rows leave at once.

Caches: image features (`cache.FeatureCache`, by image content) and prefixes: a slot keeps what its KV holds after
its sequence ends, as a key (token ids, with each image token tagged by its image's hash, since every image uses
the same placeholder token). A new request takes the idle slot sharing the longest prefix with its prompt and
starts its prefill after it (`cached_tokens`); images wholly inside the reused prefix are not even encoded.

The portable decoder form (no GroupQueryAttention) has no slab: each sequence keeps its own KV cache and is run
on its own, one decoder run per sequence per step, and there is no prefix reuse. Scheduling, the image cache and
everything above work the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass

import numpy as np

from . import memory
from .engine import Engine, KVCache
from .families import ImagePlan
from .errors import Cancelled, ContextLengthError, EdgeVLMError, InvalidRequestError
from .generate import ChoiceText, Step
from .grammar import Grammar
from .metrics import Metrics
from .sampling import ChoiceSampler, SamplingParams

PREFILL_CHUNK = 256  # prompt tokens per prefill run (GroupQueryAttention prefills one row at a time)
PREFILL_SHARE = 0.4  # at most this share of the engine's time goes to prefill while sequences are decoding
# A request with at most this much prefill work left (text tokens, no image to encode) runs it at once, whatever
# the share: it costs the running streams a few milliseconds and saves it a wait of up to a tile's repayment.
SMALL_PREFILL = 64
# A slot whose cached prefix matches at least this share of what it holds is reused for a new request (as
# llama.cpp's --slot-prompt-similarity); otherwise an empty or least recently used slot is taken.
PREFIX_SIMILARITY = 0.5

logger = logging.getLogger("edgevlm.engine")


@dataclass(frozen=True)
class JobEnd:
    """The last event of every job: what its prompt reused. Choices without a finish_reason by then were cut."""

    cached_tokens: int = 0


@dataclass
class PromptImage:
    """One image of a prompt: features from the cache, or the fitted image to encode (`plan.runs` vision runs)."""

    key: str
    plan: ImagePlan
    features: np.ndarray | None = None  # [plan.tokens, hidden] when the cache had them
    image: object = None  # else the fitted PIL image to encode


@dataclass
class Prompt:
    """What the engine needs for one request: token ids, their prefix-cache key, and its images in order."""

    input_ids: list[int]
    key: np.ndarray  # int64 [len(input_ids)]: the ids, image tokens replaced by a tag of their image
    images: list[PromptImage]
    image_tokens: int  # prompt positions filled by image features (OpenAI's usage.prompt_tokens_details)
    max_tokens: int  # per choice, settled by `Scheduler.plan`
    positions: tuple[np.ndarray, int] | None = None  # M-RoPE: 3-D positions [3, len] and the decode offset


@dataclass
class _Slot:
    index: int
    key: np.ndarray  # what its KV positions hold (valid up to `length`)
    length: int = 0
    owner: "Job | None" = None
    tick: int = 0  # when it was last used: least recently used slots are reused first


class Sequence:
    """One choice being generated."""

    def __init__(self, job: "Job", choice: int, sampler: ChoiceSampler, text: ChoiceText,
                 grammar: Grammar | None):
        self.job, self.choice, self.sampler, self.text = job, choice, sampler, text
        self.grammar = grammar.start() if grammar is not None else None
        self.slot: _Slot | None = None  # fused form: its row of the slab
        self.cache: KVCache | None = None  # portable form: its own KV cache
        self.length = 0  # positions in its KV cache
        self.rope_delta = 0  # a token's rotary position = its KV position + rope_delta (M-RoPE offsets; 0 here)
        self.last_token: int | None = None  # sampled, not yet run through the decoder
        self.logits: np.ndarray | None = None  # what its next token is sampled from
        self.done = False


class Job:
    """One request inside the engine: its prompt, parameters, sequences and where it sends its events."""

    def __init__(self, prompt: Prompt, params: SamplingParams, emit: Callable[[object], None], *,
                 grammar: Grammar | None = None, cancelled: Callable[[], bool] = lambda: False):
        self.prompt, self.params, self.emit, self.grammar, self.cancelled = prompt, params, emit, grammar, cancelled
        self.sequences: list[Sequence] = []
        self.pos = 0  # prompt positions already in the primary sequence's KV cache
        self.cached_tokens = 0
        self.vision_feeds = None  # the image being encoded: an iterator over its vision runs' inputs
        self.run_features: list[np.ndarray] = []
        self.vision_seconds = 0.0
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.ended = False
        self.ids = np.asarray(prompt.input_ids, dtype=np.int64)
        self.image_positions = np.empty(0, np.int64)  # prompt positions of image tokens, set by the scheduler
        self.rows: list[tuple[int, int]] = []  # each image's rows among them
        self.spans: list[tuple[int, int]] = []  # each image's first and last+1 prompt position
        self.features = [image.features for image in prompt.images]  # this job's; the prompt may be reused

    @property
    def prefilled(self) -> bool:
        return self.pos >= len(self.ids)

    def needed_images(self) -> list[int]:
        """Images without features that own prompt positions at or after `pos` (earlier ones are in the KV cache
        already, reused from a prefix)."""
        return [i for i, (_, end) in enumerate(self.spans) if self.features[i] is None and end > self.pos]

    def remaining(self, run_cost: int) -> int:
        """Prefill work left, in token-equivalents (a vision run counts `run_cost`): the least goes first."""
        runs = sum(self.prompt.images[i].plan.runs for i in self.needed_images())
        return runs * run_cost + len(self.ids) - self.pos


class Scheduler:
    def __init__(self, engine: Engine, tokenizer, eos_token_ids: Seq[int], *, max_batch: int, kv_budget_bytes: int,
                 image_cache, vision_inputs: Callable[[PromptImage], object],
                 metrics: Metrics, default_max_tokens: int | None = None, prefix_cache_bytes: int | None = None):
        self.engine, self.tokenizer, self.eos = engine, tokenizer, tuple(eos_token_ids)
        self.max_batch, self.kv_budget = max_batch, kv_budget_bytes
        self.image_cache, self.vision_inputs, self.metrics = image_cache, vision_inputs, metrics
        self.default_max_tokens = default_max_tokens
        self.prefix_cache_bytes = prefix_cache_bytes  # None: idle slots keep what they hold (up to the budget)
        self.vocab = engine.package.text["vocab_size"]
        # A vision run costs about as much as this many prompt tokens of prefill (least work left goes first).
        self.run_cost = 4 * engine.package.vision.get("image_seq_len", 64)
        self.fused = engine.decoder_form == "fused"
        per_slot = kv_budget_bytes // (max_batch * engine.kv_bytes_per_token)
        self.slot_positions = min(engine.max_kv_length, per_slot)
        if self.slot_positions < 2:
            raise InvalidRequestError(
                f"the KV budget of {kv_budget_bytes / 1e6:g} MB holds {per_slot} positions per sequence for "
                f"{max_batch} sequences: raise --kv-budget-mb or lower --max-batch")
        self.slab = engine.slab(max_batch, self.slot_positions) if self.fused else None
        self.slots = [_Slot(i, np.full(self.slot_positions, -1, np.int64)) for i in range(max_batch)]
        self._written = [0] * max_batch  # per slab row: positions written since its memory was last given back
        metrics.kv_slots.set(max_batch)
        metrics.kv_slot_positions.set(self.slot_positions)
        metrics.kv_bytes.set(self.slab.nbytes if self.slab is not None else 0)
        self._lock = threading.Condition()
        self._incoming: list[Job] = []
        self._waiting: list[Job] = []  # in order, not yet given slots
        self._active: list[Job] = []  # holding slots: prefilling or decoding
        self._tick = 0
        self._balance = 0.0  # seconds of prefill the decode steps have paid for (negative: owed)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="edgevlm-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------- interface

    def plan(self, prompt_tokens: int, n: int, requested: int | None) -> int:
        """The one place a request's size is checked against the model and the engine: → each choice's
        max_tokens. `requested` is the client's max_tokens; left out, it is the package's default, lowered to what
        a sequence can hold. Raises InvalidRequestError for a request that can never fit."""
        context = self.engine.context_length
        if prompt_tokens >= context:
            raise ContextLengthError(f"the prompt is {prompt_tokens} tokens; the model's context of {context} tokens "
                                     "leaves no room for an answer", param="messages")
        self.check_choices(n)
        room = min(context, self.slot_positions) - prompt_tokens
        if requested is not None:
            if requested > context - prompt_tokens:
                requested = context - prompt_tokens  # OpenAI's API stops at the context, as it always has here
            if requested > room:
                raise InvalidRequestError(
                    f"this request needs {prompt_tokens} prompt + {requested} completion tokens per choice; a KV "
                    f"slot holds {self.slot_positions} positions ({self.kv_budget / 1e6:g} MB for {self.max_batch} "
                    "sequences: edgevlm serve --kv-budget-mb / --max-batch)", param="max_tokens")
            return requested
        if room < 1:
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens; a KV slot holds {self.slot_positions} positions "
                f"({self.kv_budget / 1e6:g} MB for {self.max_batch} sequences: edgevlm serve --kv-budget-mb / "
                "--max-batch)", param="messages")
        return min(room, self.default_max_tokens or room)

    def check_choices(self, n: int) -> None:
        """A request's n choices run at once, a slot each: more than the slots can never run."""
        if n > self.max_batch:
            raise InvalidRequestError(f"Invalid 'n': {n} choices need {n} KV slots; this server runs at most "
                                      f"{self.max_batch} sequences at once (edgevlm serve --max-batch)", param="n")

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise Cancelled("the engine has stopped")
            self._incoming.append(job)
            self._lock.notify()

    def close(self) -> None:
        """Stop the loop; jobs still inside end without finishing (JobEnd with their choices cut)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)

    # ----------------------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._incoming or self._waiting or self._active or self._closed):
                    self._lock.wait()
                if self._closed:
                    jobs, self._incoming = self._incoming + self._waiting + self._active, []
                    self._waiting, self._active = [], []
                    for job in jobs:
                        self._end(job)
                    return
                self._waiting.extend(self._incoming)
                self._incoming.clear()
            try:
                self._iterate()
            except Exception as exc:  # the engine itself failed: every job inside gets the error
                for job in self._active + self._waiting:
                    self._end(job, exc)
                self._active, self._waiting = [], []
            if not (self._active or self._waiting):
                memory.release()  # idle: what the requests' work grew goes back to the system
            self._gauges()

    def _iterate(self) -> None:
        for job in [j for j in self._waiting + self._active if j.cancelled()]:
            self._end(job)
        self._admit()
        decoding = [s for job in self._active if job.prefilled for s in job.sequences if not s.done]
        prefilling = [job for job in self._active if not job.prefilled]
        left = {id(j): j.remaining(self.run_cost) for j in prefilling}
        job = min(prefilling, key=lambda j: left[id(j)]) if prefilling else None
        if job is not None and (not decoding or self._balance >= 0 or left[id(job)] <= SMALL_PREFILL):
            start = time.perf_counter()
            try:
                self._prefill_unit(job)
            except Exception as exc:
                self._end(job, exc if isinstance(exc, EdgeVLMError) else _internal(exc))
            spent = time.perf_counter() - start
            if decoding:
                self._balance -= spent
        if decoding:
            start = time.perf_counter()
            self._decode(decoding)
            spent = time.perf_counter() - start
            self.metrics.decode_seconds.inc(spent)
            self.metrics.decode_tokens.inc(len(decoding))
            self.metrics.decode_rate.set(len(decoding) / spent if spent > 0 else 0)
            self.metrics.batch.observe(len(decoding))
            # Prefill may take PREFILL_SHARE of the time: each decode second pays for share / (1 - share) of it;
            # a small credit is kept so a lone new request starts at once.
            self._balance = min(self._balance + spent * PREFILL_SHARE / (1 - PREFILL_SHARE), 0.05)
        elif not prefilling:
            self._balance = 0.0

    def _gauges(self) -> None:
        m = self.metrics
        running = [s for job in self._active for s in job.sequences if not s.done]
        m.running.set(len(running))
        m.waiting.set(len(self._waiting) + len(self._incoming))
        m.kv_used.set(sum(s.length for s in running))
        m.kv_cached.set(sum(slot.length for slot in self.slots if slot.owner is None))
        if self.image_cache is not None:
            m.image_cache_bytes.set(self.image_cache.nbytes)

    # ------------------------------------------------------------------------------------------ admission

    def _free_slots(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.owner is None]

    def _admit(self) -> None:
        while self._waiting:
            job = self._waiting[0]
            n = job.params.n
            free = self._free_slots()
            if len(free) < n or (not self.fused and not self._portable_fits(job)):
                return  # first come, first served: a large request is not overtaken forever
            self._waiting.pop(0)
            self.metrics.queue_time.observe(time.perf_counter() - job.submitted)
            try:
                self._start(job, free)
            except Exception as exc:
                self._end(job, exc if isinstance(exc, EdgeVLMError) else _internal(exc))

    def _portable_fits(self, job: Job) -> bool:
        held = sum((len(j.ids) + j.prompt.max_tokens) * len(j.sequences) for j in self._active)
        need = (len(job.ids) + job.prompt.max_tokens) * job.params.n
        return not self._active or (held + need) * self.engine.kv_bytes_per_token <= self.kv_budget

    def _start(self, job: Job, free: list[_Slot]) -> None:
        params, prompt = job.params, job.prompt
        positions = np.flatnonzero(job.ids == self.engine.image_token_id)
        counts = [image.plan.tokens for image in prompt.images]
        if len(positions) != sum(counts):
            raise InvalidRequestError(f"the prompt has {len(positions)} image tokens but its images give "
                                      f"{sum(counts)} image features", param="messages")
        ends = np.cumsum(counts, dtype=np.int64)
        job.image_positions = positions
        job.rows = [(int(end - count), int(end)) for count, end in zip(counts, ends)]
        job.spans = [(int(positions[lo]), int(positions[hi - 1]) + 1) for lo, hi in job.rows]
        job.sequences = [Sequence(job, i, ChoiceSampler(params, self.vocab, i),
                                  ChoiceText(self.tokenizer, params.stop, prompt.max_tokens, self.eos), job.grammar)
                         for i in range(params.n)]
        slots = self._choose_slots(job, free)
        self._tick += 1
        for seq, slot in zip(job.sequences, slots):
            seq.slot, slot.owner, slot.tick = slot, job, self._tick
        primary = slots[0]
        reuse = 0
        if self.fused:
            # At least the prompt's last token is run again: its logits are what the first token is drawn from.
            reuse = min(_common_prefix(primary.key, primary.length, job.prompt.key), len(job.ids) - 1)
        primary.length = reuse
        job.pos = job.cached_tokens = reuse
        job.sequences[0].length = reuse
        if prompt.positions is not None:
            for seq in job.sequences:
                seq.rope_delta = prompt.positions[1]
        (self.metrics.prefix_hits if reuse else self.metrics.prefix_misses).inc()
        self.metrics.cached_tokens.inc(reuse)
        for i, image in enumerate(prompt.images):  # another request may have cached it since this one was prepared
            if job.features[i] is None and self.image_cache is not None:
                cached = self.image_cache.get(image.key)
                if cached is not None:
                    job.features[i] = cached.features
                    self.metrics.image_hits.inc()
        self._active.append(job)

    def _choose_slots(self, job: Job, free: list[_Slot]) -> list[_Slot]:
        """The primary slot: the free one sharing the longest prefix with the prompt, if that prefix is most of
        what the slot holds; else an empty or the least recently used one. The other choices take the least
        valuable free slots."""
        by_value = sorted(free, key=lambda s: (s.length > 0, s.tick, s.index))
        primary = by_value[0]
        if self.fused:
            best, best_len = None, 0
            for slot in free:
                common = _common_prefix(slot.key, slot.length, job.prompt.key)
                if common > best_len and common >= PREFIX_SIMILARITY * slot.length:
                    best, best_len = slot, common
            if best is not None:
                primary = best
        rest = [slot for slot in by_value if slot is not primary]
        return [primary] + rest[: job.params.n - 1]

    # -------------------------------------------------------------------------------------------- prefill

    def _prefill_unit(self, job: Job) -> None:
        """One vision tile of an image the prompt still needs, or one chunk of prompt tokens; after the last chunk
        the first token of each choice is sampled."""
        needed = job.needed_images()
        if needed:
            self._encode_run(job, needed[0])
            return
        start = time.perf_counter()
        begin, end = job.pos, min(job.pos + PREFILL_CHUNK, len(job.ids))
        embeds = self._chunk_embeds(job, begin, end)
        primary = job.sequences[0]
        # M-RoPE: the chunk's own 3-D rows (without them the engine uses 1-D positions at the KV positions).
        positions = job.prompt.positions
        rope = self.engine.rope_feeds(positions[0][:, begin:end], three_d=True) if positions is not None else None
        if self.fused:
            logits = self.slab.run(primary.slot.index, embeds, np.array([begin]), rope, logits=end == len(job.ids))
            primary.slot.key[begin:end] = job.prompt.key[begin:end]
            primary.slot.length = end
            self._wrote(primary.slot.index, end)
        else:
            if primary.cache is None:
                primary.cache = self.engine.empty_cache()
            logits, primary.cache = self.engine.forward(embeds, primary.cache, rope=rope)
            logits = logits[:, -1]
        job.pos = primary.length = end
        spent = time.perf_counter() - start
        self.metrics.prefill_tokens.inc(end - begin)
        self.metrics.prefill_seconds.inc(spent)
        self.metrics.prefill_rate.set((end - begin) / spent if spent > 0 else 0)
        if not job.prefilled:
            return
        job.features = [None] * len(job.features)  # in the KV cache now
        for seq in job.sequences[1:]:  # the other choices start from the same prefill
            if self.fused:
                self.slab.copy(primary.slot.index, [seq.slot.index], end)
                seq.slot.key[:end] = primary.slot.key[:end]
                seq.slot.length = end
                self._wrote(seq.slot.index, end)
            else:
                seq.cache = primary.cache.take([0])
            seq.length = end
        for seq in job.sequences:
            seq.logits = logits[0]
        self._sample(job.sequences)

    def _encode_run(self, job: Job, index: int) -> None:
        """One vision encoder run of image `index` (preparing its inputs first, the first time)."""
        image = job.prompt.images[index]
        start = time.perf_counter()
        if job.vision_feeds is None:
            job.vision_feeds, job.run_features, job.vision_seconds = iter(self.vision_inputs(image)), [], 0.0
        last = len(job.run_features) == image.plan.runs - 1
        features = self.engine.run_vision(next(job.vision_feeds), last=last)
        job.run_features.append(features.reshape(-1, features.shape[-1]))
        job.vision_seconds += time.perf_counter() - start
        if last:
            features = job.features[index] = np.concatenate(job.run_features)
            job.vision_feeds, job.run_features = None, []
            self.metrics.vision.observe(job.vision_seconds)
            self.metrics.image_misses.inc()
            if self.image_cache is not None:
                self.image_cache.put(image.key, features, image.plan)

    def _chunk_embeds(self, job: Job, begin: int, end: int) -> np.ndarray:
        """Token embeddings of prompt positions [begin, end), with image features at the image tokens."""
        embeds = self.engine.embed(job.ids[None, begin:end])
        positions = job.image_positions
        first, last = np.searchsorted(positions, [begin, end])  # the image tokens of this chunk, by index
        if first == last:
            return embeds
        pieces = []
        for features, (lo, hi) in zip(job.features, job.rows):
            a, b = max(first, lo), min(last, hi)
            if a < b:
                pieces.append(features.reshape(-1, embeds.shape[-1])[a - lo:b - lo])
        embeds = embeds.copy()
        embeds[0, positions[first:last] - begin] = np.concatenate(pieces)
        return embeds

    # --------------------------------------------------------------------------------------------- decode

    def _compact(self, decoding: list[Sequence]) -> None:
        """Move the decoding rows to [0, d): swap each one above d with a row below d that is not decoding."""
        d = len(decoding)
        mine = {id(seq.slot) for seq in decoding}
        low = [slot for slot in self.slots[:d] if id(slot) not in mine]
        high = [seq.slot for seq in decoding if seq.slot.index >= d]
        for a, b in zip(low, high):
            self.slab.swap(a.index, b.index, max(a.length, b.length))
            self._wrote(a.index, max(a.length, b.length))
            self._wrote(b.index, max(a.length, b.length))
            a.index, b.index = b.index, a.index
            self.slots[a.index], self.slots[b.index] = a, b
            self.metrics.row_moves.inc()

    def _decode(self, decoding: list[Sequence]) -> None:
        if self.fused:
            rows = sorted(decoding, key=lambda seq: seq.slot.index)
            lo = rows[0].slot.index
            if rows[-1].slot.index - lo + 1 != len(rows):  # not one contiguous range: move them to 0 .. d-1
                self._compact(decoding)
                rows, lo = sorted(decoding, key=lambda seq: seq.slot.index), 0
            tokens = np.array([seq.last_token for seq in rows], np.int64)
            past = np.array([seq.length for seq in rows], np.int32)
            rope = None
            if self.engine.rotary == "mrope":  # each row at its KV position + its rope offset
                rope = self.engine.rope_feeds(np.array([[seq.length + seq.rope_delta] for seq in rows]))
            logits = self.slab.run(lo, self.engine.embed(tokens[:, None]), past, rope)
            for seq, row_logits in zip(rows, logits):
                seq.slot.key[seq.length] = seq.last_token
                seq.length += 1
                seq.slot.length = seq.length
                seq.logits = row_logits
                self._wrote(seq.slot.index, seq.length)
        else:
            for seq in decoding:
                rope = None
                if self.engine.rotary == "mrope":
                    rope = self.engine.rope_feeds(np.array([[seq.length + seq.rope_delta]]))
                out, seq.cache = self.engine.forward(self.engine.embed(np.array([[seq.last_token]])), seq.cache,
                                                     rope=rope)
                seq.length += 1
                seq.logits = out[0, -1]
        self._sample(decoding)

    def _sample(self, sequences: list[Sequence]) -> None:
        now = time.perf_counter()
        for seq in sequences:
            job = seq.job
            if job.ended:
                continue
            state = seq.grammar
            try:
                sample = seq.sampler.sample(seq.logits, state.apply if state is not None else None)
                if state is not None:
                    state.advance(sample.token)
            except Exception as exc:
                self._end(job, exc if isinstance(exc, EdgeVLMError) else _internal(exc))
                continue
            seq.logits = None
            text, finish = seq.text.feed(sample.token, complete=state is not None and state.is_finished())
            if job.first_token is None:
                job.first_token = now
                self.metrics.ttft.observe(now - job.submitted)
            job.emit(Step(seq.choice, text, sample.token, sample, finish, seq.text.tokens))
            if finish is None:
                seq.last_token = sample.token
            else:
                self._retire(seq)
                if all(s.done for s in job.sequences):
                    self._end(job)

    # ------------------------------------------------------------------------------------------- retiring

    def _retire(self, seq: Sequence) -> None:
        seq.done = True
        seq.cache = None
        if seq.slot is not None:
            seq.slot.owner = None  # its KV stays, keyed, for a later request with the same prefix
            self._tick += 1
            seq.slot.tick = self._tick

    def _trim_prefix_cache(self) -> None:
        """Keep what idle slots hold within `prefix_cache_bytes`: empty the least recently used ones (their pages go
        back to the system), and give back what a slot holds past its length (left by a longer sequence)."""
        if self.slab is None or self.prefix_cache_bytes is None:
            return
        idle = sorted((slot for slot in self.slots if slot.owner is None and slot.length > 0), key=lambda s: s.tick)
        per_token = self.engine.kv_bytes_per_token
        held = sum(slot.length for slot in idle) * per_token
        for slot in idle:
            if held <= self.prefix_cache_bytes:
                break
            held -= slot.length * per_token
            slot.length = 0
            self.metrics.prefix_evictions.inc()
        for slot in self.slots:
            if slot.owner is None and self._written[slot.index] > slot.length:
                self.slab.release(slot.index, keep=slot.length)
                self._written[slot.index] = slot.length

    def _wrote(self, row: int, end: int) -> None:
        if end > self._written[row]:
            self._written[row] = end

    def _end(self, job: Job, error: Exception | None = None) -> None:
        if job.ended:
            return
        job.ended = True
        for seq in job.sequences:
            if not seq.done:
                self._retire(seq)
                if seq.slot is not None and seq.slot.length > seq.length:
                    seq.slot.length = seq.length
        self._trim_prefix_cache()
        if job in self._active:
            self._active.remove(job)
        if job in self._waiting:
            self._waiting.remove(job)
        job.vision_feeds = None
        if error is not None:
            job.emit(error)
        if job.first_token is not None:
            self.metrics.latency.observe(time.perf_counter() - job.submitted)
        job.emit(JobEnd(job.cached_tokens))


def _common_prefix(key: np.ndarray, length: int, prompt_key: np.ndarray) -> int:
    n = min(length, len(prompt_key))
    if n == 0:
        return 0
    differ = np.flatnonzero(key[:n] != prompt_key[:n])
    return int(differ[0]) if differ.size else n


def _internal(exc: Exception) -> EdgeVLMError:
    logger.error("generation failed", exc_info=exc)
    return EdgeVLMError("generation failed")


