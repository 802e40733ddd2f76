"""Parity of an exported package against transformers, the reference.

For each graph, the max |Δ| between onnxruntime and the PyTorch module on a real input (a drawn image through the
HF processor and the chat template), then a greedy run with the KV cache compared token for token with
`model.generate(do_sample=False)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..runtime.engine import Engine
from ..runtime.package import ModelPackage
from .families import family_named
from .samples import sample_image

# fp32 graphs compute what torch computes up to float reordering; 1e-3 on logits is the project's bound.
FP32_ATOL = 1e-3


@dataclass
class QuantQuality:
    """A quantized package against the fp32 graphs it was made from, on the same real input (informational: a
    random-weight model's near-flat logits flip top-1 easily; judge quality on trained or real weights)."""

    features_rel: float  # max |Δ| of image features / max |fp32 features|
    logits_max_abs: float  # next-token logits at the prompt's last 32 positions
    logits_rel: float  # ... / max |fp32 logits|
    top1_agreement: float  # share of those positions whose argmax agrees
    kl: float  # mean KL(fp32 ‖ quantized) over those positions, nats
    # the same package with its int8 KV cache graphs (export/kv_int8.py), where it has them
    kv_int8_logits_rel: float | None = None
    kv_int8_top1_agreement: float | None = None
    kv_int8_kl: float | None = None

    @property
    def ok(self) -> bool:
        return all(np.isfinite([self.features_rel, self.logits_max_abs, self.kl]
                               + ([] if self.kv_int8_kl is None else [self.kv_int8_kl])))

    def lines(self) -> list[str]:
        return [
            "quantized package against the fp32 graphs (same input):",
            f"  image features   max|Δ| / max|fp32| = {self.features_rel:.2%}",
            f"  prefill logits   max|Δ| = {self.logits_max_abs:.3e} ({self.logits_rel:.2%} of max|fp32|)",
            f"  top-1 agreement  {self.top1_agreement:.1%} of prompt positions; mean KL {self.kl:.4f} nats"
            + ("" if self.ok else "  FAIL (non-finite outputs)"),
        ] + ([] if self.kv_int8_kl is None else [
            f"  with the int8 KV cache: max|Δ| {self.kv_int8_logits_rel:.2%} of max|fp32|, top-1 agreement "
            f"{self.kv_int8_top1_agreement:.1%}, mean KL {self.kv_int8_kl:.4f} nats"
            + ("" if np.isfinite(self.kv_int8_kl) else "  FAIL (non-finite outputs)")])


@dataclass
class Report:
    checks: list[tuple[str, float, float]] = field(default_factory=list)  # (name, max |Δ|, tolerance)
    greedy_reference: list[int] = field(default_factory=list)
    greedy_package: list[int] = field(default_factory=list)
    quantization: QuantQuality | None = None

    @property
    def greedy_match(self) -> bool:
        return self.greedy_reference == self.greedy_package

    @property
    def ok(self) -> bool:
        return (self.greedy_match and all(delta <= tol for _, delta, tol in self.checks)
                and (self.quantization is None or self.quantization.ok))

    def lines(self) -> list[str]:
        out = ["verification against transformers (fp32 reference):"]
        for name, delta, tol in self.checks:
            out.append(f"  {name:<28} max|Δ| = {delta:.3e}  (≤ {tol:.0e})  {'ok' if delta <= tol else 'FAIL'}")
        n = len(self.greedy_reference)
        if self.greedy_match:
            out.append(f"  greedy {n} tokens with KV cache: identical to transformers.generate  ok")
        else:
            first = next((i for i, (a, b) in enumerate(zip(self.greedy_reference, self.greedy_package)) if a != b),
                         min(len(self.greedy_reference), len(self.greedy_package)))
            out.append(f"  greedy tokens differ from transformers.generate at position {first}: "
                       f"reference {self.greedy_reference} vs package {self.greedy_package}  FAIL")
        if self.quantization is not None:
            out.extend(self.quantization.lines())
        return out

    def to_dict(self) -> dict:
        out = {
            "ok": self.ok,
            "max_abs_diff": {name: delta for name, delta, _ in self.checks},
            "greedy_tokens": len(self.greedy_reference),
            "greedy_identical": self.greedy_match,
        }
        if self.quantization is not None:
            out["quantization_vs_fp32"] = asdict(self.quantization)
        return out


def _max_diff(a, b) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


@torch.no_grad()
def verify_package(model, processor, package: ModelPackage, *, greedy_tokens: int = 16,
                   atol: float = FP32_ATOL) -> Report:
    engine = Engine(package)
    family = family_named(package.manifest["family"])
    report = Report()
    eos_ids = list(package.tokens["eos_token_ids"])
    # One view per image keeps the check fast at real sizes (17 tiles of 512 px take a minute on a laptop CPU);
    # the test suite covers image splitting.
    inputs = family.chat_inputs(processor, [sample_image()], "Describe this image.", single_view=True)
    input_ids = inputs["input_ids"]

    hf_features = family.reference_features(model, inputs)
    features = family.package_features(engine, inputs)
    report.checks.append(("vision_encoder features", _max_diff(features, hf_features), atol))

    # The references are transformers' own modules, not the export wrappers.
    ref_embeds = model.get_input_embeddings()(input_ids)
    embeds = engine.embed(input_ids.numpy())
    report.checks.append(("embed_tokens", _max_diff(embeds, ref_embeds), atol))

    # The decoder graph alone: same spliced embeddings in, prefill then one decode step with the cache. A family
    # with M-RoPE passes its prompt's 3-D positions to both (HF cannot derive them from embeddings alone).
    spliced = engine.splice_image_features(input_ids.numpy(), ref_embeds.numpy(), hf_features.numpy())
    seq = spliced.shape[1]
    positions = family.positions(model, inputs) if hasattr(family, "positions") else None
    position_kwargs, rope, delta = {}, None, 0
    if positions is not None:
        position_kwargs = {"position_ids": torch.from_numpy(positions[0])[:, None, :]}
        rope, delta = engine.rope_feeds(positions[0], three_d=True), positions[1]
    ref_out = model(inputs_embeds=torch.from_numpy(spliced), attention_mask=torch.ones(1, seq, dtype=torch.long),
                    use_cache=True, **position_kwargs)
    logits, kv = engine.forward(spliced, engine.empty_cache(), rope=rope)
    # A fused decoder computes the last position's logits only (that is all generation reads).
    ref_logits = ref_out.logits if engine.logits_all_positions else ref_out.logits[:, -1:]
    report.checks.append(("decoder prefill logits", _max_diff(logits, ref_logits), atol))
    next_token = torch.tensor([[int(ref_out.logits[0, -1].argmax())]])
    if positions is not None:
        position_kwargs = {"position_ids": torch.full((3, 1, 1), seq + delta)}
    ref_step = model(input_ids=next_token, attention_mask=torch.ones(1, seq + 1, dtype=torch.long),
                     past_key_values=ref_out.past_key_values, use_cache=True, **position_kwargs)
    step_logits, kv = engine.decode_step(int(next_token), kv, rope_delta=delta)
    report.checks.append(("decoder decode-step logits", _max_diff(step_logits, ref_step.logits), atol))
    ref_cache = ref_step.past_key_values.layers
    report.checks.append(("decoder present key/values", max(
        max(_max_diff(keys, ref_cache[i].keys), _max_diff(values, ref_cache[i].values))
        for i, (keys, values) in enumerate(map(kv.arrays, range(len(kv.keys))))), atol))

    # End to end: the package's greedy loop against transformers.generate on the same processor outputs. Plain
    # greedy: a checkpoint's generation_config may carry a repetition_penalty (Qwen2-VL's cards: 1.05), which the
    # OpenAI API has no field for and edgevlm does not apply.
    generated = model.generate(**inputs, max_new_tokens=greedy_tokens, do_sample=False, eos_token_id=eos_ids,
                               pad_token_id=package.tokens["pad_token_id"], repetition_penalty=1.0)
    report.greedy_reference = generated[0, input_ids.shape[1]:].tolist()
    report.greedy_package = engine.greedy(input_ids.numpy(), features, greedy_tokens, tuple(eos_ids),
                                          positions=positions)
    return report


def position_logits(engine: Engine, input_ids: np.ndarray, features: np.ndarray | None,
                    positions: int = 32, rope_positions: np.ndarray | None = None) -> np.ndarray:
    """Next-token logits [P, vocab] at every one of the prompt's last `positions` positions (teacher forcing).

    A portable decoder returns them from one prefill. A fused decoder returns the last position only, so the prompt
    minus its last P−1 tokens is prefilled and those tokens are fed one by one, as a decode loop would.
    `rope_positions`: an M-RoPE prompt's 3-D positions [3, S].
    """

    def rope(lo, hi):
        return None if rope_positions is None else engine.rope_feeds(rope_positions[:, lo:hi], three_d=True)

    input_ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
    positions = min(positions, input_ids.shape[1])
    embeds = engine.splice_image_features(input_ids, engine.embed(input_ids), features)
    if engine.logits_all_positions:
        logits, _ = engine.forward(embeds, engine.empty_cache(), rope=rope(0, input_ids.shape[1]))
        return logits[0, -positions:]
    split = input_ids.shape[1] - positions + 1
    logits, cache = engine.forward(embeds[:, :split], engine.empty_cache(), reserve=positions, rope=rope(0, split))
    rows = [logits[0, -1]]
    for i in range(split, input_ids.shape[1]):
        logits, cache = engine.forward(embeds[:, i:i + 1], cache, rope=rope(i, i + 1))
        rows.append(logits[0, -1])
    return np.stack(rows)


def compare_packages(processor, reference: ModelPackage, package: ModelPackage, model=None) -> QuantQuality:
    """Run the fp32 `reference` and the quantized `package` on one real input; how far apart are they?

    Logit figures cover the prompt's last 32 positions (teacher-forced), so fused and portable decoders compare
    alike."""
    family = family_named(package.manifest["family"])
    inputs = family.chat_inputs(processor, [sample_image()], "Describe this image.", single_view=True)
    input_ids = inputs["input_ids"].numpy()
    rope_positions = family.positions(model, inputs)[0] if hasattr(family, "positions") else None
    outputs = []
    runs = [(reference, "float32"), (package, "float32")]
    if "kv_int8" in package.graph("decoder"):
        runs.append((package, "int8"))
    for pkg, kv_cache in runs:
        engine = Engine(pkg, kv_cache=kv_cache)
        features = family.package_features(engine, inputs)
        logits = position_logits(engine, input_ids, features, rope_positions=rope_positions)
        outputs.append((features.astype(np.float64), logits.astype(np.float64)))
    (ref_features, ref_logits), (features, logits) = outputs[:2]

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref_logp = log_softmax(ref_logits)

    def kl(candidate):
        return float((np.exp(ref_logp) * (ref_logp - log_softmax(candidate))).sum(-1).mean())

    def top1(candidate):
        return float((candidate.argmax(-1) == ref_logits.argmax(-1)).mean())

    def rel(candidate):
        return float(np.abs(candidate - ref_logits).max() / np.abs(ref_logits).max())

    kv8 = {}
    if len(outputs) == 3:
        kv8_logits = outputs[2][1]
        kv8 = {"kv_int8_logits_rel": rel(kv8_logits), "kv_int8_top1_agreement": top1(kv8_logits),
               "kv_int8_kl": kl(kv8_logits)}
    return QuantQuality(
        features_rel=float(np.abs(features - ref_features).max() / np.abs(ref_features).max()),
        logits_max_abs=float(np.abs(logits - ref_logits).max()),
        logits_rel=rel(logits),
        top1_agreement=top1(logits),
        kl=kl(logits),
        **kv8,
    )
