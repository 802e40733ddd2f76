"""onnxruntime sessions for a model package's three graphs, and the prefill / decode steps with a KV cache.

Data flow: pixel values → `encode_images` → image features; prompt ids → `embed` → token embeddings;
`splice_image_features` puts the image features at the image-token positions; `forward` runs the decoder on new
embeddings after what the cache already holds and returns logits (every new position for a portable decoder, the
last one for a fused decoder) plus the grown cache.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

import edgevlm

from . import int8_prefill, kv_int8, memory, rope
from .errors import ContextLengthError, InvalidRequestError, PackageError
from .package import ModelPackage

if edgevlm.ORT_TELEMETRY_MAY_BE_ON:
    warnings.warn("onnxruntime was imported before edgevlm without ORT_DISABLE_TELEMETRY=1: its telemetry may "
                  "contact the network; set ORT_DISABLE_TELEMETRY=1 before importing onnxruntime", stacklevel=2)


@dataclass
class KVCache:
    """Per-layer keys and values, [batch, kv_heads, length, head_dim] each, as onnxruntime values.

    They stay where the decoder wrote them (host memory on CPU, GPU memory with CUDA): each step binds them as the
    next step's inputs, so the cache is never copied through numpy between steps.

    Two layouts, after the decoder's form:
      * portable: each step's `present` tensors are new values of exactly `length` positions (`used` is None);
      * fused: preallocated buffers of `capacity` positions that GroupQueryAttention appends to in place; `used`
        says how many positions hold tokens. A decode step writes one position and copies nothing.
    """

    keys: list[ort.OrtValue]
    values: list[ort.OrtValue]
    used: int | None = None
    # fused: the decoder's IOBinding with these buffers bound as past and present, and the preallocated logits
    # output [batch, 1, vocab], made at the first step and reused by every later one (rebinding 2 × layers
    # buffers each step cost ~0.1 ms, ORT-allocated logits another ~0.5 ms per step at SmolVLM-256M size).
    binding: object = field(default=None, repr=False, compare=False)
    logits: np.ndarray | None = field(default=None, repr=False, compare=False)
    # the int8 prefill graph's IOBinding over the same buffers (an int4 package's prompt chunks), made on first use
    prefill_binding: object = field(default=None, repr=False, compare=False)

    @property
    def length(self) -> int:
        return self.keys[0].shape()[2] if self.used is None else self.used

    @property
    def capacity(self) -> int:
        return self.keys[0].shape()[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape()[0]

    def arrays(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's keys and values, the used positions only (for checks, not the decode loop)."""
        n = self.length
        return self.keys[layer].numpy()[:, :, :n], self.values[layer].numpy()[:, :, :n]

    def take(self, rows: list[int]) -> "KVCache":
        """A cache holding the given batch rows (repeat a prefill for n choices, drop finished choices)."""
        device = self.keys[0].device_name().lower()

        def pick(value: ort.OrtValue) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[rows]), device, 0)

        return KVCache(keys=[pick(k) for k in self.keys], values=[pick(v) for v in self.values], used=self.used)


def shared_kv_binding(session: ort.InferenceSession, keys, values):
    """An IOBinding of `session` (a fused decoder graph) with each layer's key and value buffer (OrtValues) bound
    as both past and present: GroupQueryAttention sees the shared memory and writes only the new positions."""
    binding = session.io_binding()
    for i, (key, value) in enumerate(zip(keys, values)):
        for name, buffer in (("key", key), ("value", value)):
            binding.bind_ortvalue_input(f"past_key_values.{i}.{name}", buffer)
            binding.bind_ortvalue_output(f"present.{i}.{name}", buffer)
    return binding


class Slab:
    """The fused decoder's KV cache for every running sequence: per layer, one preallocated key buffer and one value
    buffer of [slots, kv_heads, capacity, head_dim], a slot (row) per sequence.

    A decode step runs the decoder once over a contiguous range of rows [lo, hi) through a zero-copy view of those
    rows, each row at its own length (GroupQueryAttention's per-row `seqlens_k`); a prefill chunk runs one row the
    same way. Admitting or retiring a sequence copies nothing: it is a row index. The buffers are zero pages until a
    row writes them, so resident memory follows the positions actually used. Bindings (the views bound as past and
    present, and a logits buffer) are made once per row range and reused.
    """

    def __init__(self, engine: "Engine", slots: int, capacity: int):
        self.engine, self.slots, self.capacity = engine, slots, capacity
        shape = (slots, engine.kv_heads, capacity, engine.head_dim)
        self.keys = [np.zeros(shape, engine._kv_dtype) for _ in range(engine.num_layers)]
        self.values = [np.zeros(shape, engine._kv_dtype) for _ in range(engine.num_layers)]
        for buffer in self.keys + self.values:
            memory.sparse(buffer)  # resident as written, not in 2 MB pages (memory.py)
        self._bindings: dict[tuple[int, int], tuple[object, np.ndarray]] = {}
        self._prefill_bindings: dict[int, object] = {}

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def _binding(self, lo: int, hi: int):
        found = self._bindings.get((lo, hi))
        if found is None:
            binding = shared_kv_binding(self.engine.decoder, *self._views(lo, hi))
            logits = np.empty((hi - lo, 1, self.engine.package.text["vocab_size"]), np.float32)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            found = self._bindings[(lo, hi)] = (binding, logits)
        return found

    def _views(self, lo: int, hi: int) -> tuple[list, list]:
        """Rows lo..hi-1 of every layer's keys and values as OrtValues (no copy)."""
        return ([ort.OrtValue.ortvalue_from_numpy(k[lo:hi]) for k in self.keys],
                [ort.OrtValue.ortvalue_from_numpy(v[lo:hi]) for v in self.values])

    def _prefill_binding(self, row: int):
        binding = self._prefill_bindings.get(row)
        if binding is None:
            binding = self._prefill_bindings[row] = shared_kv_binding(self.engine.prefill_decoder,
                                                                       *self._views(row, row + 1))
        return binding

    def run(self, lo: int, inputs_embeds: np.ndarray, past: np.ndarray, rope: dict | None = None, *,
            logits: bool = True) -> np.ndarray | None:
        """Rows lo .. lo + B - 1 take `inputs_embeds` [B, S, hidden] after their `past` [B] cached positions (S > 1
        only for one row: GroupQueryAttention prefills one row at a time after a past). → logits [B, vocab] of each
        row's last new position (a copy). `rope`: an M-RoPE decoder's rotary feeds (`Engine.rope_feeds`); left out,
        each row's tokens take 1-D positions at their KV positions.

        A prompt chunk (S > 1) of a package with an int8 prefill graph runs there (`Engine.prefill_decoder`), which
        gives no logits: with `logits=False` (a chunk before a prompt's last) all of it, else its first S − 1
        positions, the last one going through the decoder graph for the logits. So every prompt position but the
        prompt's last is computed by the int8 graph, however the prompt is cut into chunks. `logits=False` may
        return None."""
        batch, seq = inputs_embeds.shape[:2]
        past = np.asarray(past, dtype=np.int32)
        if int(past.max()) + seq > self.capacity:
            raise ContextLengthError(f"a sequence needs {int(past.max()) + seq} positions, more than a KV slot's "
                                     f"{self.capacity}", param="messages")
        engine = self.engine
        if engine.rotary == "mrope" and rope is None:  # 1-D positions at each row's KV position
            rope = engine.rope_feeds(past[:, None].astype(np.int64) + np.arange(seq))
        if seq > 1 and engine.has_prefill_graph:
            head, tail = (rope, None) if not logits else engine.split_rope(rope, seq)
            chunk = inputs_embeds if not logits else inputs_embeds[:, :-1]
            if engine._kv_scratch is not None:  # an int8 cache: the chunk on a float32 copy of the row
                engine._kv_scratch.run((id(self), lo), [k[lo:lo + 1] for k in self.keys],
                                       [v[lo:lo + 1] for v in self.values], chunk, int(past[0]), head)
                if logits:
                    engine._kv_scratch.release()
            else:
                engine.run_prefill(self._prefill_binding(lo), chunk, int(past[0]), head)
            if not logits:
                return None
            return self.run(lo, inputs_embeds[:, -1:], past + (seq - 1), tail)
        binding, logits = self._binding(lo, lo + batch)
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        binding.bind_cpu_input("seqlens_k", past + (seq - 1))
        binding.bind_cpu_input("total_sequence_length", np.array(int(past.max()) + seq, dtype=np.int32))
        if engine.rotary == "mrope":
            for name, value in rope.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        engine.decoder.run_with_iobinding(binding, engine._shrink_arena if seq >= 256 else None)
        return logits[:, 0].copy()  # the buffer is overwritten by the next run of this range

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first `length` positions of rows `a` and `b` (the scheduler keeps decoding rows packed)."""
        self.engine.forget_prompt_rows()
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                held = buffer[a, :, :length].copy()
                buffer[a, :, :length] = buffer[b, :, :length]
                buffer[b, :, :length] = held

    def release(self, row: int, keep: int = 0) -> None:
        """Give back the memory of row `row`'s positions from `keep` on (an emptied slot, or what a shorter
        sequence left behind of a longer one): per layer and head, a contiguous run of positions."""
        self.engine.forget_prompt_rows()
        if keep >= self.capacity:
            return
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                for head in buffer[row]:
                    memory.discard(head[keep:])

    def copy(self, source: int, targets: list[int], length: int) -> None:
        """Give rows `targets` the first `length` positions of row `source` (a request's n choices after their one
        prefill): a copy within the slab, once per request."""
        self.engine.forget_prompt_rows()
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[targets, :, :length] = buffer[source, :, :length]


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share one core's vector units; onnxruntime's GEMMs
    gain nothing from the second thread of a core and lose to its contention)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            siblings = open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read().strip()
        except OSError:
            return len(cpus) or 1
        cores.add(siblings)
    return len(cores) or 1


def _providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise PackageError(
                "device 'cuda' was asked for, but this onnxruntime has no CUDA provider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu in place of onnxruntime"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise PackageError(f"unknown device {device!r} (use 'cpu' or 'cuda')")


class Engine:
    def __init__(self, package: ModelPackage, *, device: str = "cpu", threads: int | None = None,
                 defer_vision: bool = False, opening: threading.Event | None = None, int8_prefill: bool = True,
                 kv_cache: str = "float32"):
        """`defer_vision` (CPU only): the vision encoder's session (~0.4 s of a 0.75 s SmolVLM-256M start) is made
        on first use or by `open_vision` (the server calls it on a thread right after it reports ready); a request
        with images that comes first waits for it, and an error making it is that request's error. `opening` is set
        as onnxruntime starts the first session (it runs without the GIL from then on: other threads can work)."""
        self.package = package
        self.threads = threads or physical_cores()

        def session_options(threads: int) -> ort.SessionOptions:
            made = ort.SessionOptions()
            made.intra_op_num_threads = threads
            made.log_severity_level = 3
            made.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            made.enable_cpu_mem_arena = True
            # No memory pattern: it preplans one block for all of a run's intermediates, which at SmolVLM-256M size
            # held ~120 MB more per vision tile than allocating from the arena as tensors are made, and was no
            # faster.
            made.enable_mem_pattern = False
            # Workers spin between the many small kernels of a decode step instead of sleeping and waking (~10% at
            # SmolVLM-256M size); an idle server stops spinning as soon as no run is in flight.
            made.add_session_config_entry("session.intra_op.allow_spinning", "1")
            # ...but only within a run: each session has its own pool, and workers still spinning after a decode step
            # took a core from the next prompt chunk or vision tile of the other sessions (an int8 prefill of 1,139
            # positions interleaved with decode steps: 0.75-0.84 s with spinning between runs, 0.65 s without; a
            # back-to-back decode step 5.0-5.3 ms either way).
            made.add_session_config_entry("session.force_spinning_stop", "1")
            return made

        options = session_options(self.threads)
        # The embedding graph is a table lookup (a 2,043-token prompt's rows in ~1 ms): it runs on the calling thread
        # alone, without a pool of its own whose worker would spin after each decode step's lookup beside the
        # decoder's workers (no decode-speed change measurable on 2 cores within the machine's drift; one thread
        # fewer).
        single = session_options(1)
        providers = _providers(device)
        self._ort_device = "cuda" if device == "cuda" else "cpu"

        def session(graph: str, path: Path | None = None) -> ort.InferenceSession:
            if opening is not None:
                opening.set()
            try:
                made = ort.InferenceSession(str(path or package.graph_path(graph)),
                                            single if graph == "embed_tokens" else options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise PackageError(f"model package {package.path}: cannot load the {graph} graph: {exc}") from None
            # onnxruntime falls back to the CPU when the CUDA provider fails to start (driver, CUDA or cuDNN
            # mismatch), with a warning below our log level: a GPU server silently on the CPU is an error here.
            if providers[0] != "CPUExecutionProvider" and made.get_providers()[0] != providers[0]:
                raise PackageError(f"model package {package.path}: the {graph} graph did not start on "
                                   f"{providers[0]} (onnxruntime fell back to {made.get_providers()[0]}): check "
                                   "that the CUDA and cuDNN versions match this onnxruntime-gpu build")
            return made

        decoder = package.graph("decoder")
        self._kv_dtype = np.dtype(decoder.get("kv_dtype", "float32"))
        self.decoder_form = decoder.get("form", "portable")
        decoder_path = None
        # kv_cache "int8": the package's int8-cache variant of the fused decoder, over the same weights
        # (export/kv_int8.py); "auto": that where the package has it (and the device runs it), else float32
        if kv_cache == "auto":
            kv_cache = "int8" if "kv_int8" in decoder and device == "cpu" else "float32"
        self.kv_cache = kv_cache
        if kv_cache == "int8":
            variant = decoder.get("kv_int8")
            if variant is None or device != "cpu":
                raise PackageError(
                    f"model package {package.path}: "
                    + ("has no int8 KV cache graphs (int4 fused packages have them since they were added: "
                       "re-export it, or serve it with --kv-cache float32)" if variant is None else
                       "the int8 KV cache runs on the CPU only: serve it with --kv-cache float32 on CUDA"))
            self._kv_dtype = np.dtype(variant["kv_dtype"])
            decoder_path = package.path / variant["file"]
        elif kv_cache != "float32":
            raise PackageError(f"unknown KV cache type {kv_cache!r} (use auto, float32 or int8)")
        if self.decoder_form not in ("portable", "fused"):
            raise PackageError(f"model package {package.path}: unknown decoder form {self.decoder_form!r}")
        if device == "cuda" and self.decoder_form == "fused" and self._kv_dtype == np.float32:
            # onnxruntime's CUDA GroupQueryAttention takes fp16/bf16 only: a float32 fused decoder would run its
            # attention on the CPU, copying every layer's activations across the bus each step.
            raise PackageError(
                f"model package {package.path}: its fused float32 decoder is built for CPUs; for a GPU export with "
                "--quant fp16 (portable decoder, float16 KV cache)")
        # Run option for the last run of a memory-hungry phase (an image's tiles, a long prefill): the CPU arena
        # returns the chunks that phase grew and no longer uses, so the vision encoder's activations (~190 MB a
        # tile at SmolVLM-256M size) and the prefill's are not held on top of each other for the process's life.
        self._shrink_arena = ort.RunOptions()
        self._shrink_arena.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                                "cpu:0" if device == "cpu" else "cpu:0;gpu:0")
        self._session = session
        self._session_options = session_options
        self._vision: ort.InferenceSession | None = None
        self._vision_lock = threading.Lock()
        # The int8 prefill graph (export/prefill_graph.py): CPU only (its MatMulIntegerToFloat weights are made on
        # the host), the fused form's prompt chunks only.
        self._prefill_spec = decoder.get("prefill") if int8_prefill and device == "cpu" else None
        self._prefill: ort.InferenceSession | None = None
        self._prefill_lock = threading.Lock()
        # An int8 KV cache: prompt chunks run on the float32-cache prefill graph over a float32 copy of the row and
        # are stored as int8 (runtime/kv_int8.py); without a prefill graph they run on the int8-cache decoder.
        self._kv_scratch = None
        if kv_cache == "int8" and self._prefill_spec is not None:
            try:
                self._kv_scratch = kv_int8.PromptScratch(self, kv_int8.load_steps(package.path, decoder["kv_int8"]))
            except (OSError, KeyError, ValueError) as exc:
                raise PackageError(f"model package {package.path}: cannot read the int8 KV cache steps: {exc}") \
                    from None
        if not (defer_vision and device == "cpu"):  # on CUDA the provider check of every graph stays at load
            self.open_vision()
            self.open_prefill()
        # The two text sessions are built side by side (onnxruntime holds no GIL while it builds one): the small
        # embedding graph on a thread of its own, beside the decoder's weight prepacking.
        embed: dict = {}

        def build_embed() -> None:
            try:
                embed["session"] = session("embed_tokens")
            except BaseException as exc:  # noqa: BLE001 - re-raised below, on this thread
                embed["error"] = exc

        embed_thread = threading.Thread(target=build_embed, name="edgevlm-embed-session", daemon=True)
        embed_thread.start()
        try:
            self.decoder = session("decoder", decoder_path)
        finally:
            embed_thread.join()
        if "error" in embed:
            raise embed.pop("error")
        self.embed_tokens = embed.pop("session")
        text = package.text
        self.num_layers = text["num_layers"]
        self.kv_heads = text["num_key_value_heads"]
        self.head_dim = text["head_dim"]
        self.context_length = text["context_length"]
        self.image_token_id = package.tokens["image_token_id"]
        # The fused graph's rotary tables have max_sequence_length rows: its KV buffers can hold no more.
        self.max_kv_length = min(self.context_length, int(decoder.get("max_sequence_length", self.context_length)))
        # M-RoPE decoders take their rotary rows as inputs (export/fused_decoder.py); others derive positions.
        self.rotary = decoder.get("rotary")
        if self.rotary not in (None, "mrope"):
            raise PackageError(f"model package {package.path}: unknown decoder rotary {self.rotary!r}")
        if self.rotary == "mrope":
            self._inv_freq = rope.inv_freq(self.head_dim, float(decoder["rope_theta"]))
            self._mrope_section = list(decoder["mrope_section"])
        # Keys and values of every layer for one position of one sequence: what a request's KV cache costs.
        self.kv_bytes_per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * self._kv_dtype.itemsize

    @property
    def vision(self) -> ort.InferenceSession:
        """The vision encoder's session, made now if it was deferred (waiting for `open_vision` if it is under
        way on another thread)."""
        return self._vision or self.open_vision()

    def open_vision(self) -> ort.InferenceSession:
        """Make the vision encoder's session if it is not made yet; PackageError when onnxruntime cannot."""
        with self._vision_lock:
            if self._vision is None:
                self._vision = self._session("vision_encoder")
            return self._vision

    @property
    def has_prefill_graph(self) -> bool:
        """Whether prompt chunks run on the int8 prefill graph (`prefill_decoder`)."""
        return self._prefill_spec is not None

    @property
    def prefill_decoder(self) -> ort.InferenceSession:
        """The int8 prefill graph's session, made now if it was deferred (waiting for `open_prefill`)."""
        return self._prefill or self.open_prefill()

    def open_prefill(self) -> ort.InferenceSession | None:
        """Make the int8 prefill graph's session (its int8 weights derived from the decoder's 4-bit blocks: ~0.8 s
        at SmolVLM-256M size) if the package has one and it is not made yet; PackageError when it cannot be."""
        if self._prefill_spec is None:
            return None
        with self._prefill_lock:
            if self._prefill is None:
                spec, folder = self._prefill_spec, self.package.path
                options = self._session_options(self.threads)
                try:
                    files = {spec["derived_file"]: int8_prefill.derived_file(folder, spec)}
                    files.update({name: np.memmap(folder / name, dtype=np.uint8, mode="r")
                                  for name in spec.get("external_data", [])})
                    options.add_external_initializers_from_files_in_memory(
                        list(files), list(files.values()), [buffer.nbytes for buffer in files.values()])
                    # onnxruntime copies what it needs from these buffers while it makes the session
                    self._prefill = ort.InferenceSession(str(folder / spec["file"]), options,
                                                         providers=["CPUExecutionProvider"])
                except (OSError, KeyError, ValueError, ort.capi.onnxruntime_pybind11_state.Fail,
                        ort.capi.onnxruntime_pybind11_state.InvalidGraph) as exc:
                    raise PackageError(f"model package {folder}: cannot load the int8 prefill graph: {exc}") from None
            return self._prefill

    def forget_prompt_rows(self) -> None:
        """KV rows moved or changed outside a prefill: an int8 cache's prompt copy is made again at the next chunk."""
        if self._kv_scratch is not None:
            self._kv_scratch.forget()

    def split_rope(self, rope: dict | None, seq: int) -> tuple[dict | None, dict | None]:
        """A prompt chunk's rotary feeds cut into its first seq − 1 positions and its last one (the position rows
        index the same cos/sin tables)."""
        if rope is None:
            return None, None
        head, tail = dict(rope), dict(rope)
        head["position_ids"] = np.ascontiguousarray(rope["position_ids"][..., :seq - 1])
        tail["position_ids"] = np.ascontiguousarray(rope["position_ids"][..., seq - 1:])
        return head, tail

    def run_prefill(self, binding, inputs_embeds: np.ndarray, past: int, rope: dict | None) -> None:
        """One row's prompt positions through the int8 prefill graph, after `past` cached positions; it writes their
        keys and values in place (the binding's buffers) and gives no logits."""
        seq = inputs_embeds.shape[1]
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        binding.bind_cpu_input("seqlens_k", np.array([past + seq - 1], dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(past + seq, dtype=np.int32))
        for name, value in (rope or {}).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self.prefill_decoder.run_with_iobinding(binding, self._shrink_arena if seq >= 255 else None)

    def rope_feeds(self, positions: np.ndarray, *, three_d: bool = False) -> dict[str, np.ndarray]:
        """The rotary inputs of an M-RoPE decoder: `positions` [B, S] (1-D positions: text, decode steps), or with
        `three_d` [3, S] (one row's 3-D positions, a prompt with images) → for the fused form position_ids
        indexing cos/sin rows made for exactly those tokens, for the portable form position_ids [3, B, S]."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.decoder_form == "portable":  # the traced transformers model takes the positions themselves
            rows = positions[:, None, :] if three_d else np.broadcast_to(positions, (3, *positions.shape))
            return {"position_ids": np.ascontiguousarray(rows)}
        if three_d:
            cos, sin = rope.mrope_tables(positions, self._inv_freq, self._mrope_section)
            return {"position_ids": np.arange(positions.shape[1], dtype=np.int64)[None], "cos_cache": cos,
                    "sin_cache": sin}
        flat = positions.reshape(-1)
        cos, sin = rope.mrope_tables(np.broadcast_to(flat, (3, flat.size)), self._inv_freq, self._mrope_section)
        return {"position_ids": np.arange(flat.size, dtype=np.int64).reshape(positions.shape), "cos_cache": cos,
                "sin_cache": sin}

    def warm_up(self) -> None:
        """One decoder step at load, so the first request does not pay for first-run allocations (~0.1 s at
        SmolVLM-256M size). The vision graph is left cold: run one tile at a time, its first run is no slower than
        the next (0.58 s against 0.55 s for an int8 tile at SmolVLM-256M size), so warming it would only add a
        tile's time to every start."""
        self.decode_step(0, self.empty_cache())

    def encode_images(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray) -> np.ndarray:
        """[B, N, 3, H, W] float32 + [B, N, H, W] bool → [real images, image_seq_len, hidden] image features.

        One tile per vision run: at SmolVLM-256M size a 17-tile batch in one run needs ~2.5 GB of activations
        (attention over 1,024 patches per tile, 12 heads, 12 layers) and is slower (13.9 s against 7.9 s for 16
        int8 tiles on 2 cores: the per-tile working set stays in cache). All-zero padding images are skipped, as
        the graph itself (and transformers) drops them.
        """
        pixel_values = np.asarray(pixel_values, dtype=np.float32).reshape(-1, 1, *pixel_values.shape[2:])
        pixel_attention_mask = np.asarray(pixel_attention_mask, dtype=bool).reshape(
            -1, 1, *pixel_attention_mask.shape[2:])
        real = [i for i in range(pixel_values.shape[0]) if pixel_values[i].any()]
        if not real:  # nothing but padding: let the graph answer (no features)
            real_runs = [(pixel_values[:1], pixel_attention_mask[:1])]
        else:
            real_runs = [(pixel_values[i:i + 1], pixel_attention_mask[i:i + 1]) for i in real]
        features = [self.vision.run(None, {"pixel_values": values, "pixel_attention_mask": mask},
                                    self._shrink_arena if i == len(real_runs) - 1 else None)[0]
                    for i, (values, mask) in enumerate(real_runs)]
        return np.concatenate(features) if len(features) > 1 else features[0]

    def run_vision(self, feed: dict[str, np.ndarray], *, last: bool = False) -> np.ndarray:
        """One vision encoder run (a family's `vision_inputs`) → its features, [1, n, hidden] or [n, hidden];
        `last`: the last run of an image, after which the arena gives back what the runs grew."""
        return self.vision.run(None, feed, self._shrink_arena if last else None)[0]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        (embeds,) = self.embed_tokens.run(None, {"input_ids": np.asarray(input_ids, dtype=np.int64)})
        return embeds

    def splice_image_features(self, input_ids: np.ndarray, inputs_embeds: np.ndarray,
                              image_features: np.ndarray | None) -> np.ndarray:
        """Replace the embeddings at image-token positions with the image features, in order."""
        positions = np.asarray(input_ids) == self.image_token_id
        count = int(positions.sum())
        features = (np.zeros((0, inputs_embeds.shape[-1]), inputs_embeds.dtype) if image_features is None
                    else image_features.reshape(-1, inputs_embeds.shape[-1]))
        if count != features.shape[0]:
            raise InvalidRequestError(
                f"the prompt has {count} image tokens but the images give {features.shape[0]} image features",
                param="messages",
            )
        if count:
            inputs_embeds = inputs_embeds.copy()
            inputs_embeds[positions] = features
        return inputs_embeds

    @property
    def logits_all_positions(self) -> bool:
        """Whether `forward` returns logits for every new position (portable) or the last one only (fused)."""
        return self.decoder_form == "portable"

    def slab(self, slots: int, capacity: int) -> Slab:
        """KV buffers for `slots` sequences of up to `capacity` positions each (fused decoder only)."""
        if self.decoder_form != "fused":
            raise PackageError("a KV slab needs the fused decoder form")
        return Slab(self, slots, min(capacity, self.max_kv_length))

    def empty_cache(self, batch: int = 1) -> KVCache:
        return self._allocate_cache(batch, 0)

    def _allocate_cache(self, batch: int, capacity: int, old: KVCache | None = None) -> KVCache:
        def value(previous: ort.OrtValue | None) -> ort.OrtValue:
            array = np.zeros((batch, self.kv_heads, capacity, self.head_dim), self._kv_dtype)
            if previous is not None and old.length:
                array[:, :, :old.length] = previous.numpy()[:, :, :old.length]
            return ort.OrtValue.ortvalue_from_numpy(array, self._ort_device, 0)

        keys = [value(old.keys[i] if old else None) for i in range(self.num_layers)]
        values = [value(old.values[i] if old else None) for i in range(self.num_layers)]
        return KVCache(keys=keys, values=values, used=None if self.decoder_form == "portable" else
                       (old.length if old else 0))

    def forward(self, inputs_embeds: np.ndarray, cache: KVCache, *, reserve: int = 0,
                rope: dict | None = None) -> tuple[np.ndarray, KVCache]:
        """Run the decoder on `inputs_embeds` [B, S, hidden] after the cache; → logits and the grown cache.

        Logits are [B, S, vocab] for a portable decoder, [B, 1, vocab] (last position) for a fused one. With a fused
        decoder the returned cache is `cache` itself, extended in place; when its buffers are full they are
        reallocated with room for `reserve` more tokens (the caller's expected answer length) or twice the size.
        """
        batch, seq = inputs_embeds.shape[:2]
        past = cache.length
        if past + seq > self.context_length:
            raise ContextLengthError(
                f"the conversation needs {past + seq} tokens, more than the model's context of "
                f"{self.context_length} tokens",
                param="messages",
            )
        if self.decoder_form == "fused":
            return self._forward_fused(inputs_embeds, cache, reserve, rope)
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        binding.bind_cpu_input("attention_mask", np.ones((batch, past + seq), dtype=np.int64))
        if self.rotary == "mrope" and rope is None:
            rope = self.rope_feeds(np.broadcast_to(np.arange(past, past + seq), (batch, seq)))
        binding.bind_cpu_input("position_ids", rope["position_ids"] if rope is not None else np.ascontiguousarray(
            np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq))))
        for i in range(self.num_layers):
            binding.bind_ortvalue_input(f"past_key_values.{i}.key", cache.keys[i])
            binding.bind_ortvalue_input(f"past_key_values.{i}.value", cache.values[i])
        binding.bind_output("logits", "cpu")
        for i in range(self.num_layers):
            binding.bind_output(f"present.{i}.key", self._ort_device)
            binding.bind_output(f"present.{i}.value", self._ort_device)
        self.decoder.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), KVCache(keys=present[0::2], values=present[1::2])

    def _forward_fused(self, inputs_embeds: np.ndarray, cache: KVCache, reserve: int,
                       rope: dict | None = None) -> tuple[np.ndarray, KVCache]:
        batch, seq = inputs_embeds.shape[:2]
        total = cache.length + seq
        if total > self.max_kv_length:
            raise ContextLengthError(f"the conversation needs {total} tokens, more than this package's decoder "
                                     f"holds ({self.max_kv_length})", param="messages")
        if total > cache.capacity:
            # Round up to 256 positions so short growth steps do not reallocate every call.
            wanted = max(total + reserve, 2 * cache.capacity, -(-total // 256) * 256)
            cache = self._allocate_cache(batch, min(wanted, self.max_kv_length), cache)
        if self.rotary == "mrope" and rope is None:
            rope = self.rope_feeds(np.broadcast_to(np.arange(total - seq, total), (batch, seq)))
        if seq > 1 and batch == 1 and self.has_prefill_graph:  # a prompt: all but its last position in int8
            head, tail = self.split_rope(rope, seq)
            if self._kv_scratch is not None:  # an int8 cache: on a float32 copy (runtime/kv_int8.py)
                self._kv_scratch.run(("cache", id(cache.keys[0])), [k.numpy() for k in cache.keys],
                                     [v.numpy() for v in cache.values], inputs_embeds[:, :-1], total - seq, head)
                self._kv_scratch.release()
            else:
                if cache.prefill_binding is None:
                    cache.prefill_binding = shared_kv_binding(self.prefill_decoder, cache.keys, cache.values)
                self.run_prefill(cache.prefill_binding, inputs_embeds[:, :-1], total - seq, head)
            cache.used = total - 1
            return self._forward_fused(inputs_embeds[:, -1:], cache, reserve, tail)
        binding = cache.binding
        if binding is None:
            binding = cache.binding = shared_kv_binding(self.decoder, cache.keys, cache.values)
            cache.logits = np.empty((batch, 1, self.package.text["vocab_size"]), np.float32)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(cache.logits))
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        binding.bind_cpu_input("seqlens_k", np.full((batch,), total - 1, dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        if self.rotary == "mrope":
            for name, value in rope.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        # After a long prefill, hand its activation memory back: decode steps need a fraction of it.
        self.decoder.run_with_iobinding(binding, self._shrink_arena if seq >= 256 else None)
        cache.used = total
        # A copy: the buffer is overwritten by the next step while callers may still hold these logits.
        return cache.logits.copy(), cache

    def prefill(self, input_ids: np.ndarray, image_features: np.ndarray | None = None, *,
                reserve: int = 0, rope: dict | None = None) -> tuple[np.ndarray, KVCache]:
        """Embed the prompt, splice in image features, run it through the decoder from an empty cache (with room
        for `reserve` generated tokens when the decoder preallocates its cache)."""
        input_ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        embeds = self.splice_image_features(input_ids, self.embed(input_ids), image_features)
        return self.forward(embeds, self.empty_cache(), reserve=reserve, rope=rope)

    def decode_step(self, token_id: int, cache: KVCache, *, rope_delta: int = 0) -> tuple[np.ndarray, KVCache]:
        embeds = self.embed(np.array([[token_id]], dtype=np.int64))
        rope = self.rope_feeds(np.array([[cache.length + rope_delta]])) if self.rotary == "mrope" else None
        return self.forward(embeds, cache, rope=rope)

    def greedy(self, input_ids: np.ndarray, image_features: np.ndarray | None, max_new_tokens: int,
               stop_ids: tuple[int, ...] = (), *, positions: tuple[np.ndarray, int] | None = None) -> list[int]:
        """Greedy decoding with the KV cache: argmax at every step, stop on an id in `stop_ids`. `positions`:
        an M-RoPE prompt's 3-D positions and decode offset (`families.qwen2vl.rope_index`)."""
        rope, delta = None, 0
        if positions is not None:
            rope, delta = self.rope_feeds(positions[0], three_d=True), positions[1]
        logits, cache = self.prefill(input_ids, image_features, reserve=max_new_tokens, rope=rope)
        tokens: list[int] = []
        while len(tokens) < max_new_tokens:
            token = int(np.argmax(logits[0, -1]))
            tokens.append(token)
            if token in stop_ids or len(tokens) == max_new_tokens:
                break
            logits, cache = self.decode_step(token, cache, rope_delta=delta)
        return tokens
