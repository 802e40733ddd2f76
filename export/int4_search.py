"""Calibrated 4-bit decoder weights on MatMulNBits' integer grid: importance-weighted block search and GPTQ.

Plain round-to-nearest (onnxruntime's `MatMulNBitsQuantizer`) picks each block's scale from its largest weight and
ignores which input channels matter. The algorithms here use activation statistics of the fp32 graph itself
(calibration conversations through its own decoder, see `collect_hessians`) and write the same MatMulNBits nodes:
4-bit weights, one float scale per block and, when asymmetric, one uint4 zero point per block. accuracy_level 4
(int8 activations inside the kernel) stays usable, and the decode speed stays that of the RTN plan; float zero
points (HQQ) would take the kernel off its int8 path.

- ``search`` (like llama.cpp's imatrix): per block, the scale (and integer zero point) minimising
  Σ_i E[x_i²]·(w_i − deq(q_i))² over a grid of candidates, each refined by weighted least squares.
- ``gptq`` (Frantar et al. 2022): columns quantized one input channel at a time, the error of each spread over the
  channels not yet quantized through the inverse Hessian H = E[x xᵀ]; each block's scale and zero point are fixed
  (by the weighted search above, importance diag(H)) when the sweep reaches the block, so the result lies exactly
  on MatMulNBits' grid.

Weights are the MatMul's B [K, N]; blocks run along K (input channels), as in MatMulNBits. `BlockQuant` holds the
integer result in MatMulNBits' own layout (`to_matmulnbits` packs it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALGORITHMS = ("search", "gptq")

# Calibration: chat conversations written here (never the evaluation prompts of benchmarks/quant_quality.py),
# rendered with the package's own chat template. Some carry an assistant turn, so answers are seen too.
CALIBRATION_PROMPTS = [
    "Who wrote the novel Pride and Prejudice?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "What is the difference between weather and climate?",
    "Can you suggest a healthy breakfast for a busy morning?",
    "How many legs does a spider have?",
    "Write a haiku about autumn leaves.",
    "Explain what a black hole is to a ten-year-old.",
    "What are the main causes of the French Revolution?",
    "Give me three tips for learning a new language.",
    "How does a refrigerator keep food cold?",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Write a short story about a robot who learns to paint.",
    "Why do cats purr?",
    "Name four planets in our solar system and one fact about each.",
    "How do I make a cup of green tea?",
    "What does a software engineer do all day?",
    "Compose a limerick about a forgetful wizard.",
    "What is photosynthesis?",
    "Describe the water cycle step by step.",
    "If a train travels 60 miles in one hour, how far does it go in four hours?",
    "What is the square root of 144?",
    "Convert 5 kilometers to miles.",
    "Which ocean is the largest on Earth?",
    "Write an email to my landlord asking to fix a leaking tap.",
    "What are some good houseplants for a dark apartment?",
    "How can I improve my sleep?",
    "Explain the rules of chess briefly.",
    "What is the tallest mountain in Africa?",
    "Tell me a joke about computers.",
    "What should I pack for a weekend camping trip?",
    "How do vaccines work?",
    "Write a Python function that reverses a string.",
    "What is the meaning of the word 'ephemeral'?",
    "Give me a recipe for simple pancakes.",
    "Why is exercise important for mental health?",
    "Who painted the Mona Lisa?",
    "What is the population of Japan, roughly?",
    "Describe a sunset over the mountains.",
    "How do bees make honey?",
    "What is the capital of Canada and why was it chosen?",
    "Translate 'thank you very much' into German and Italian.",
    "List five animals that live in the Arctic.",
    "What happens when you mix baking soda and vinegar?",
    "Explain compound interest with an example.",
    "Suggest a name for a bakery that sells bread and coffee.",
    "What are the three primary colours?",
    "How long does it take light from the Sun to reach Earth?",
    "Write a motivational sentence for someone starting a new job.",
]
CALIBRATION_DIALOGUES = [
    ("What is the largest desert in the world?",
     "The largest desert in the world is the Antarctic Desert, which covers about 14 million square kilometers. "
     "If you only count hot deserts, the Sahara in North Africa is the largest."),
    ("Can you help me plan a birthday party for my daughter?",
     "Of course! First, pick a theme she loves, such as animals or space. Then choose a date, send invitations "
     "two weeks ahead, plan a few simple games, and prepare a cake and some snacks. Don't forget party bags!"),
    ("How do airplanes stay in the air?",
     "Airplanes fly because their wings are shaped to create lift. As the plane moves forward, air flows faster "
     "over the curved top of the wing than underneath it, which lowers the pressure above the wing and pushes "
     "the plane upward. The engines provide thrust to keep the plane moving."),
    ("What is 25 percent of 80?",
     "25 percent of 80 is 20, because 80 divided by 4 equals 20."),
    ("Write a short poem about the moon.",
     "Silver lantern in the night,\nYou paint the fields with gentle light.\nThe quiet sea looks up to see\n"
     "Your pale and patient company."),
    ("Why do leaves change colour in the fall?",
     "In autumn, trees stop making chlorophyll, the green pigment they use for photosynthesis. As the green "
     "fades, other pigments such as yellow and orange carotenoids become visible, and some trees also produce "
     "red anthocyanins."),
    ("Tell me about the history of the bicycle.",
     "The first bicycles appeared in Europe in the early nineteenth century. The 'running machine' of 1817 had "
     "no pedals; riders pushed it with their feet. Pedals came in the 1860s, and the safety bicycle, with two "
     "wheels of equal size and a chain drive, made cycling popular in the 1880s."),
    ("Give me some advice for a job interview.",
     "Research the company before the interview, prepare short examples of your past work, and practise "
     "answering common questions. Arrive a few minutes early, listen carefully, and ask one or two thoughtful "
     "questions at the end."),
]


def calibration_conversations() -> list[list[dict]]:
    """Chat messages for calibration: single questions, and question + answer + follow-up dialogues."""
    out = [[{"role": "user", "content": p}] for p in CALIBRATION_PROMPTS]
    follow_ups = ["Thanks! Can you say more?", "Could you make it shorter?", "Why is that?", "Give an example."]
    for i, (question, answer) in enumerate(CALIBRATION_DIALOGUES):
        out.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                    {"role": "user", "content": follow_ups[i % len(follow_ups)]}])
    # The prompts together in a few long conversations: later positions of a context get calibrated too.
    for start in range(0, len(CALIBRATION_PROMPTS), 12):
        messages = []
        for j, prompt in enumerate(CALIBRATION_PROMPTS[start:start + 12]):
            question, answer = CALIBRATION_DIALOGUES[(start // 12 + j) % len(CALIBRATION_DIALOGUES)]
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": "Thank you."})
        out.append(messages)
    return out


# --------------------------------------------------------------------------------------------------------------
# the integer result


@dataclass
class BlockQuant:
    """MatMulNBits' integer weights: q [N, blocks, block] in 0..2^bits−1, scales [N, blocks], zero points [N, blocks]
    (None: symmetric, the kernel's default zero point 2^(bits−1)). Dequantized: scale · (q − zero_point)."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int = 4

    @property
    def block_size(self) -> int:
        return self.q.shape[2]

    def zeros(self) -> np.ndarray:
        if self.zero_points is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.float32)
        return self.zero_points.astype(np.float32)

    def dequantize(self, k: int) -> np.ndarray:
        """The weight B [K, N] that MatMulNBits computes with."""
        w = (self.q.astype(np.float32) - self.zeros()[..., None]) * self.scales[..., None]
        return np.ascontiguousarray(w.reshape(w.shape[0], -1)[:, :k].T)


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """B [K, N] → [N, blocks, block] (K zero-padded to a whole number of blocks, as MatMulNBits does)."""
    k, n = w.shape
    nb = -(-k // block)
    padded = np.zeros((nb * block, n), dtype=np.float32)
    padded[:k] = w
    return np.ascontiguousarray(padded.T.reshape(n, nb, block))


def _importance_blocks(importance: np.ndarray | None, k: int, block: int) -> np.ndarray:
    nb = -(-k // block)
    out = np.zeros(nb * block, dtype=np.float32)
    out[:k] = 1.0 if importance is None else np.asarray(importance, dtype=np.float32)
    return out.reshape(nb, block)


def rtn(w: np.ndarray, block: int = 32, symmetric: bool = True, bits: int = 4) -> BlockQuant:
    """Round to nearest, as onnxruntime's MatMulNBits quantizer does (the baseline the others are measured against)."""
    qmax = (1 << bits) - 1
    wb = _blocks(w, block)
    if symmetric:
        idx = np.abs(wb).argmax(-1)
        vmax = np.take_along_axis(wb, idx[..., None], -1)[..., 0]
        scales = vmax / -float(1 << (bits - 1))
        zero = np.full(scales.shape, 1 << (bits - 1), dtype=np.float32)
    else:
        lo, hi = np.minimum(wb.min(-1), 0), np.maximum(wb.max(-1), 0)
        scales = (hi - lo) / qmax
        zero = np.clip(np.rint(-lo / np.where(scales == 0, 1, scales)), 0, qmax)
    inv = np.where(scales == 0, 0, 1 / np.where(scales == 0, 1, scales))
    q = np.clip(np.rint(wb * inv[..., None]) + zero[..., None], 0, qmax).astype(np.uint8)
    return BlockQuant(q, scales.astype(np.float32), None if symmetric else zero.astype(np.uint8), bits)


def _candidates(w, symmetric: bool, bits: int, steps: int):
    """Candidate (scale, zero point) per block row of w [R, block] (torch): [R, C] each."""
    import torch

    qmax = (1 << bits) - 1
    half = 1 << (bits - 1)
    deltas = torch.linspace(-0.5, 1.5, steps, dtype=w.dtype)  # δ = 0 is RTN's own step
    if symmetric:  # the grid is −8..7 steps: the wider side (8) or the narrower one (7) may take the largest |w|
        amax = w.abs().amax(-1, keepdim=True)
        wide = amax / (half - deltas)
        narrow = amax / (half - 1 + deltas[deltas > 0])
        scales = torch.cat([wide, -wide, narrow, -narrow], -1)
        return scales, torch.full_like(scales, float(half))
    lo = torch.clamp(w.amin(-1, keepdim=True), max=0)
    hi = torch.clamp(w.amax(-1, keepdim=True), min=0)
    scales = (hi - lo) / (qmax + deltas)
    z0 = torch.clamp(torch.round(-lo / torch.where(scales == 0, torch.ones_like(scales), scales)), 0, qmax)
    return (torch.cat([scales, scales, scales], -1),
            torch.cat([z0, torch.clamp(z0 - 1, 0, qmax), torch.clamp(z0 + 1, 0, qmax)], -1))


def _fit_blocks(wb: np.ndarray, imp: np.ndarray, symmetric: bool, bits: int = 4, steps: int = 16,
                chunk: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted scale/zero-point search for blocks wb [R, block] with importance imp [R, block] (≥ 0).

    Candidates (`_candidates`): RTN's step and steps around it (range / (levels + δ)); symmetric grids take both
    signs of the scale, asymmetric ones the zero point RTN would pick and its two neighbours. For each candidate,
    q = round(w/s) + z; the scale is then refitted to those q by weighted least squares, and the candidate with
    the least weighted error Σ a (w − s(q − z))² = Σ a w² − (Σ a w l)² / Σ a l² (l = q − z) wins. Its q are
    rounded once more with the refitted scale where that lowers the error. → q [R, block] uint8, scale, zero [R].
    """
    import torch

    qmax = (1 << bits) - 1
    rows = wb.shape[0]
    q_out = np.empty(wb.shape, dtype=np.uint8)
    s_out = np.empty(rows, dtype=np.float32)
    z_out = np.empty(rows, dtype=np.float32)

    def fit(w, a, s, z):  # → error, refitted scale, q for candidates s, z [R, C]
        inv = torch.where(s == 0, torch.zeros_like(s), 1 / torch.where(s == 0, torch.ones_like(s), s))
        q = torch.clamp(torch.round(w[:, None, :] * inv[..., None]) + z[..., None], 0, qmax)
        lv = q - z[..., None]
        awl = (a * w)[:, None, :].mul(lv).sum(-1)
        all_ = (a[:, None, :] * lv * lv).sum(-1)
        ok = all_ > 0
        fitted = torch.where(ok, awl / torch.where(ok, all_, torch.ones_like(all_)), s)
        err = (a * w * w).sum(-1, keepdim=True) - torch.where(ok, awl * fitted, torch.zeros_like(awl))
        return err, fitted, q

    for lo_row in range(0, rows, chunk):
        w = torch.from_numpy(np.ascontiguousarray(wb[lo_row:lo_row + chunk], dtype=np.float32))
        a = torch.from_numpy(np.ascontiguousarray(imp[lo_row:lo_row + chunk], dtype=np.float32)) + 1e-12
        scales, zeros = _candidates(w, symmetric, bits, steps)
        err, fitted, _ = fit(w, a, scales, zeros)
        best = err.argmin(-1, keepdim=True)
        s = fitted.gather(-1, best)
        z = zeros.gather(-1, best)
        e0, _, q0 = fit(w, a, scales.gather(-1, best), z)  # the winner's own q (its error is e0 after refit)
        e1, s1, q1 = fit(w, a, s, z)  # q re-rounded with the refitted scale, and its scale refitted again
        again = (e1 < e0)[:, 0]
        q = torch.where(again[:, None], q1[:, 0], q0[:, 0])
        s = torch.where(again, s1[:, 0], s[:, 0])
        q_out[lo_row:lo_row + chunk] = q.numpy().astype(np.uint8)
        s_out[lo_row:lo_row + chunk] = s.numpy()
        z_out[lo_row:lo_row + chunk] = z[:, 0].numpy()
    return q_out, s_out, z_out


def search(w: np.ndarray, importance: np.ndarray | None = None, block: int = 32, symmetric: bool = True,
           bits: int = 4, steps: int = 16) -> BlockQuant:
    """Importance-weighted block quantization of B [K, N]: importance [K] is E[x_k²] of the input channels."""
    k, n = w.shape
    wb = _blocks(w, block)
    nb = wb.shape[1]
    imp = np.broadcast_to(_importance_blocks(importance, k, block), wb.shape)
    q, s, z = _fit_blocks(wb.reshape(-1, block), np.ascontiguousarray(imp).reshape(-1, block), symmetric, bits, steps)
    return BlockQuant(q.reshape(n, nb, block), s.reshape(n, nb),
                      None if symmetric else z.reshape(n, nb).astype(np.uint8), bits)


def gptq(w: np.ndarray, hessian: np.ndarray, block: int = 32, symmetric: bool = True, bits: int = 4,
         damp: float = 0.01, sweep: int = 128, steps: int = 16, act_order: bool = False,
         refit: bool = False) -> BlockQuant:
    """GPTQ of B [K, N] with H = E[x xᵀ] [K, K] of its input.

    In input order (default), each block's (scale, zero point) is chosen by the weighted search when the sweep
    reaches the block, from the error-updated weights (importance diag(H)). With `act_order`, channels are
    quantized in order of decreasing E[x²] and every block's (scale, zero point) is fixed first, from the original
    weights ("static groups": the result stays on MatMulNBits' block grid). `refit`: the scales are then refitted
    to the integers by least squares on the output error (`refit_scales`).
    """
    import torch

    qmax = (1 << bits) - 1
    k, n = w.shape
    nb = -(-k // block)
    kp = nb * block
    sweep = max(block, sweep // block * block)
    W = torch.zeros((n, kp), dtype=torch.float64)
    W[:, :k] = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float64))
    H = torch.zeros((kp, kp), dtype=torch.float64)
    H[:k, :k] = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    diag = torch.diagonal(H)
    dead = diag <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = torch.diagonal(H).clone()
    s_all = np.zeros((n, nb), dtype=np.float32)
    z_all = np.zeros((n, nb), dtype=np.float32)
    perm = None
    if act_order:
        imp = np.broadcast_to(importance.numpy().astype(np.float32).reshape(nb, block), (n, nb, block))
        wb = W.to(torch.float32).numpy().reshape(n * nb, block)
        _, s_flat, z_flat = _fit_blocks(wb, np.ascontiguousarray(imp).reshape(-1, block), symmetric, bits, steps)
        s_all, z_all = s_flat.reshape(n, nb), z_flat.reshape(n, nb)
        perm = torch.argsort(importance, descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        col_block = (perm // block).numpy()
        col_s = torch.from_numpy(np.ascontiguousarray(s_all[:, col_block]))
        col_z = torch.from_numpy(np.ascontiguousarray(z_all[:, col_block]))
    H += damp * torch.mean(torch.diagonal(H)) * torch.eye(kp, dtype=torch.float64)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)  # rows of the upper factor give the error propagation

    Hinv = Hinv.to(torch.float32)
    W = W.to(torch.float32)
    q_all = torch.zeros((n, kp), dtype=torch.float32)
    for i1 in range(0, kp, sweep):
        i2 = min(i1 + sweep, kp)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for g in range(i1, i2, block):
            gi = g - i1
            if perm is None:  # the block's scale and zero point, from the weights as updated so far
                imp = np.broadcast_to(importance[g:g + block].numpy().astype(np.float32), (n, block))
                _, s, z = _fit_blocks(W1[:, gi:gi + block].numpy(), np.ascontiguousarray(imp), symmetric, bits,
                                      steps)
                s_all[:, g // block], z_all[:, g // block] = s, z
                st = torch.from_numpy(s)[:, None].expand(n, block)
                zt = torch.from_numpy(z)[:, None].expand(n, block)
            else:
                st, zt = col_s[:, g:g + block], col_z[:, g:g + block]
            inv = torch.where(st == 0, torch.zeros_like(st), 1 / torch.where(st == 0, torch.ones_like(st), st))
            for j in range(gi, gi + block):
                col = W1[:, j]
                q = torch.clamp(torch.round(col * inv[:, j - gi]) + zt[:, j - gi], 0, qmax)
                q_all[:, i1 + j] = q
                err = (col - st[:, j - gi] * (q - zt[:, j - gi])) / Hinv1[j, j]
                W1[:, j:].sub_(err[:, None] * Hinv1[j, j:][None, :])
                Err1[:, j] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        unperm = torch.empty_like(q_all)
        unperm[:, perm] = q_all
        q_all = unperm
    q_all = q_all.numpy().astype(np.uint8).reshape(n, nb, block)
    quant = BlockQuant(q_all, s_all, None if symmetric else z_all.astype(np.uint8), bits)
    return refit_scales(w, quant, hessian) if refit else quant


def refit_scales(w: np.ndarray, quant: BlockQuant, hessian: np.ndarray, ridge: float = 1e-3) -> BlockQuant:
    """The block scales that minimise the output error tr(Dᵀ H D), D = W − Ŵ, for fixed integers (q, zero points):
    per output column a least-squares problem in its block scales, (Lᵀ H L) s = Lᵀ H w (L: the levels q − z)."""
    import torch

    k, n = w.shape
    _, nb, block = quant.q.shape
    kp = nb * block
    H = torch.zeros((kp, kp), dtype=torch.float64)
    H[:k, :k] = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    levels = torch.from_numpy(quant.q.astype(np.float64) - quant.zeros().astype(np.float64)[..., None])  # [n,nb,b]
    W = torch.zeros((kp, n), dtype=torch.float64)
    W[:k] = torch.from_numpy(w.astype(np.float64))
    Hb = H.reshape(nb, block, nb, block)
    HL = torch.einsum("bicj,ncj->nbic", Hb, levels)  # [n, nb, block, nb]
    M = torch.einsum("nbi,nbic->nbc", levels, HL)
    r = torch.einsum("nbi,nbi->nb", levels, (H @ W).T.reshape(n, nb, block))
    old = torch.from_numpy(quant.scales.astype(np.float64))
    d = torch.diagonal(M, dim1=1, dim2=2)
    lam = ridge * d.mean(-1, keepdim=True) + 1e-30
    M = M + torch.diag_embed(lam.expand(n, nb))
    s = torch.linalg.solve(M, (r + lam * old)[..., None])[..., 0]
    return BlockQuant(quant.q, s.to(torch.float32).numpy(), quant.zero_points, quant.bits)


def weighted_error(w: np.ndarray, quant: BlockQuant, importance: np.ndarray | None = None) -> float:
    """Σ_k importance_k · Σ_n (w − deq)² (importance None: plain squared error)."""
    d = (w - quant.dequantize(w.shape[0])).astype(np.float64)
    imp = np.ones(w.shape[0]) if importance is None else np.asarray(importance, dtype=np.float64)
    return float((imp[:, None] * d * d).sum())


def output_error(w: np.ndarray, quant: BlockQuant, hessian: np.ndarray) -> float:
    """E‖x (W − Ŵ)‖² = tr(Dᵀ H D) for D = W − Ŵ, H = E[x xᵀ]: the error GPTQ minimises."""
    d = (w - quant.dequantize(w.shape[0])).astype(np.float64)
    return float(((np.asarray(hessian, dtype=np.float64) @ d) * d).sum())


# --------------------------------------------------------------------------------------------------------------
# MatMulNBits


def pack(quant: BlockQuant) -> tuple[np.ndarray, np.ndarray | None]:
    """B [N, blocks, block·bits/8] and packed zero points [N, ⌈blocks·bits/8⌉] as MatMulNBits reads them
    (4 bits: two values a byte, the first in the low nibble)."""
    n, nb, block = quant.q.shape
    if quant.bits == 8:
        zp = None if quant.zero_points is None else quant.zero_points.astype(np.uint8)
        return quant.q.astype(np.uint8), zp
    q = quant.q.astype(np.uint8)
    packed = (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)
    zp = None
    if quant.zero_points is not None:
        z = quant.zero_points.astype(np.uint8)
        if nb % 2:
            z = np.concatenate([z, np.full((n, 1), 8, np.uint8)], 1)  # padding nibble as onnxruntime writes it
        zp = (z[:, 0::2] & 0x0F) | ((z[:, 1::2] & 0x0F) << 4)
    return np.ascontiguousarray(packed), zp


def to_matmulnbits(node, weight_name: str, quant: BlockQuant, k: int, accuracy_level: int | None):
    """A MatMulNBits node replacing MatMul `node` (same input and output), and its initializers."""
    from onnx import helper, numpy_helper

    n, _, block = quant.q.shape
    packed, zp = pack(quant)
    bits = quant.bits
    inits = [numpy_helper.from_array(packed, f"{weight_name}_Q{bits}"),
             numpy_helper.from_array(quant.scales.astype(np.float32), f"{weight_name}_scales")]
    inputs = [node.input[0], inits[0].name, inits[1].name]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, f"{weight_name}_zero_points"))
        inputs.append(inits[2].name)
    attrs = dict(K=k, N=n, bits=bits, block_size=block)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    made = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{bits}" if node.name else "",
                            domain="com.microsoft", **attrs)
    return made, inits


# --------------------------------------------------------------------------------------------------------------
# calibration


def _session_for(model, outputs: list[str]):
    """An onnxruntime session of `model` that also returns the named intermediate tensors."""
    import tempfile
    from pathlib import Path

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    added = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    model.graph.output.extend(added)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        if model.ByteSize() < 1_800_000_000:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix=".calibrate-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    finally:
        for _ in added:
            model.graph.output.pop()


def _prefill_feeds(engine, session, embeds: np.ndarray) -> dict:
    """A decoder run over `embeds` [1, S, hidden] from an empty cache, for either decoder form."""
    seq = embeds.shape[1]
    fused = engine.decoder_form == "fused"
    feeds = {"inputs_embeds": embeds.astype(np.float32)}
    names = [i.name for i in session.get_inputs()]
    for name in names:
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((1, engine.kv_heads, seq if fused else 0, engine.head_dim), np.float32)
    if fused:
        feeds["seqlens_k"] = np.full((1,), seq - 1, np.int32)
        feeds["total_sequence_length"] = np.array(seq, np.int32)
    else:
        feeds["attention_mask"] = np.ones((1, seq), np.int64)
        feeds["position_ids"] = np.arange(seq, dtype=np.int64)[None]
    if engine.rotary == "mrope":
        feeds.update(engine.rope_feeds(np.arange(seq)[None]))
    return {k: v for k, v in feeds.items() if k in names}


def collect_hessians(model, package_dir, inputs: list[str], conversations: list[list[dict]] | None = None,
                     progress=None, answer_tokens: int = 0, quantized=None) -> tuple[dict, int]:
    """Σ xᵀx over every calibration token for each tensor in `inputs` (MatMul inputs of the decoder `model`, an
    fp32 ONNX ModelProto), running `model` itself on the conversations rendered and embedded by the package in
    `package_dir` (its tokenizer, chat template and embed_tokens graph). `answer_tokens`: each conversation that
    ends with a user turn gets the package's own greedy answer (at most that many tokens) appended first.
    → ({input: [K, K] float64}, tokens). With `quantized` (the same graph, some MatMuls quantized) the values are
    pairs (Σ x_qᵀx_q, Σ x_qᵀx) of its inputs x_q with `model`'s x, both run on the same tokens."""
    from ..runtime.vlm import VisionLanguageModel

    conversations = conversations or calibration_conversations()
    vlm = VisionLanguageModel.load(package_dir, defer_vision=True)
    try:
        session = _session_for(model, inputs)
        session_q = _session_for(quantized, inputs) if quantized is not None else None
        sums: dict = {}
        pending: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
        pending_q: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
        tokens = held = 0

        def flush():  # one product per tensor for many short conversations (a K×K product costs ~K² anyway)
            for name, parts in pending.items():
                if parts:
                    x = np.concatenate(parts)
                    if session_q is None:
                        xtx = (x.T @ x).astype(np.float64)  # float32 products of ≤ 1,024 rows, summed in float64
                        sums[name] = sums[name] + xtx if name in sums else xtx
                    else:
                        xq = np.concatenate(pending_q[name])
                        pair = ((xq.T @ xq).astype(np.float64), (xq.T @ x).astype(np.float64))
                        sums[name] = (sums[name][0] + pair[0], sums[name][1] + pair[1]) if name in sums else pair
                        pending_q[name].clear()
                    parts.clear()

        for i, messages in enumerate(conversations):
            ids = list(vlm.prepare(messages).input_ids)
            if answer_tokens:
                ids += vlm.engine.greedy(np.asarray(ids), None, answer_tokens, vlm.eos_token_ids)
            ids = np.asarray(ids, dtype=np.int64)[None]
            embeds = vlm.engine.embed(ids)
            values = session.run(inputs, _prefill_feeds(vlm.engine, session, embeds))
            for name, value in zip(inputs, values):
                pending[name].append(value.reshape(-1, value.shape[-1]).astype(np.float32))
            if session_q is not None:
                for name, value in zip(inputs, session_q.run(inputs, _prefill_feeds(vlm.engine, session_q, embeds))):
                    pending_q[name].append(value.reshape(-1, value.shape[-1]).astype(np.float32))
            tokens += ids.shape[1]
            held += ids.shape[1]
            if held >= 1024:
                flush()
                held = 0
            if progress and (i + 1) % 16 == 0:
                progress(f"  calibration: {i + 1}/{len(conversations)} conversations, {tokens} tokens")
        flush()
        del session, session_q
    finally:
        vlm.close()
    return sums, tokens


# --------------------------------------------------------------------------------------------------------------
# the graph


def quantize_matmuls(model, *, algorithm: str, block: int, symmetric: bool, accuracy_level: int | None,
                     package_dir, exclude=(), progress=None, answer_tokens: int = 0,
                     gptq_options: dict | None = None, passes: int = 1,
                     scale_alphas: tuple[float, ...] = (), scale_select: str = "gptq") -> tuple[object, dict]:
    """Replace every MatMul with a constant 2-D float32 weight (names in `exclude` aside) by a 4-bit MatMulNBits
    quantized by `algorithm` ("search" or "gptq"), calibrated on the package in `package_dir` (the fp32 package the
    graph belongs to). → (model, summary: tokens, nodes, and the weighted errors against RTN).

    `passes=2` (gptq): calibrate again on the model quantized by the first pass, and quantize each weight again
    from the fp32 one so that the quantized inputs x_q best give the fp32 outputs x·W: GPTQ of
    W' = (E[x_qᵀx_q] + λI)⁻¹ E[x_qᵀx] W under H = E[x_qᵀx_q] (the drift of earlier layers' errors compensated).

    `scale_alphas` (gptq, one pass): activation-aware input scaling of the MatMuls fed by a norm or by act(gate)·up,
    s = rms(x)^α per input channel with α from this grid (0: unscaled) giving the least output error; 1/s is folded
    exactly into the norm's gamma or the up columns of gate_up (`_scalable_norms`, `_scalable_products`).
    `scale_select="rtn"` picks α by round to nearest's output error and runs GPTQ once (export time as unscaled)."""
    from onnx import numpy_helper

    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown calibrated int4 algorithm {algorithm!r} (choose one of: {', '.join(ALGORITHMS)})")
    inits = {t.name: t for t in model.graph.initializer}
    excluded = set(exclude)
    positions = [i for i, node in enumerate(model.graph.node)
                 if node.op_type == "MatMul" and node.name not in excluded and node.input[1] in inits
                 and len(inits[node.input[1]].dims) == 2 and inits[node.input[1]].data_type == 1]
    targets = [model.graph.node[i] for i in positions]
    inputs = list(dict.fromkeys(node.input[0] for node in targets))
    sums, tokens = collect_hessians(model, package_dir, inputs, progress=progress, answer_tokens=answer_tokens)
    weights = [numpy_helper.to_array(inits[node.input[1]]).astype(np.float32) for node in targets]
    gptq_options = dict(gptq_options or {})
    # activation-aware input scaling (_scalable_*); not with passes > 1, whose second calibration would read inputs
    # already divided by the first pass's scales and fold a second scale over them
    if scale_select not in ("gptq", "rtn"):
        raise ValueError(f"unknown scale_select {scale_select!r} (choose gptq or rtn)")
    alphas = tuple(scale_alphas) if algorithm == "gptq" and passes == 1 else ()
    norms = _scalable_norms(model, targets, inits) if alphas else {}
    products = _scalable_products(model, targets, inits) if alphas else {}
    scaled_gammas: dict[str, np.ndarray] = {}  # norm gamma → the s its output is divided by
    up_columns: dict[str, tuple] = {}  # gate_up MatMul → (offset, width, s) of the down projection it feeds

    def scaled_gptq(target, hessian):
        """AWQ-style: x W = (x / s)(s W) with s = rms(x)^α per input channel; α from `alphas` minimising the
        output error after GPTQ (α = 0: unscaled). → (scale or None, quant, scaled target, scaled hessian)."""
        rms = np.sqrt(np.maximum(np.diagonal(hessian), 1e-12))
        best = None
        for alpha in alphas:
            s_ = (rms ** alpha).astype(np.float32)
            s_ /= np.sqrt(s_.max() * s_.min())
            w_s, h_s = target * s_[:, None], hessian / np.outer(s_, s_)
            q_s = rtn(w_s, block, symmetric) if scale_select == "rtn" else gptq(w_s, h_s, block, symmetric,
                                                                                  **gptq_options)
            err = output_error(w_s, q_s, h_s)
            if best is None or err < best[0]:
                best = (err, alpha, s_, q_s, w_s, h_s)
        _, alpha, scale, quant, w_s, h_s = best
        if scale_select == "rtn":
            quant = gptq(w_s, h_s, block, symmetric, **gptq_options)
        return (None if alpha == 0 else scale), quant, w_s, h_s

    def quantize_all(stats):
        errors = {"rtn": 0.0, algorithm: 0.0}
        replaced, new_inits = {}, []
        scaled_gammas.clear()
        up_columns.clear()

        def inputs_of(node, w):
            if isinstance(stats[node.input[0]], tuple):  # second pass: inputs of the quantized model
                hessian, cross = (m / max(tokens, 1) for m in stats[node.input[0]])
                lam = 0.01 * np.mean(np.diagonal(hessian)) + 1e-12
                return np.linalg.solve(hessian + lam * np.eye(len(hessian)), cross @ w).astype(np.float32), hessian
            return w, stats[node.input[0]] / max(tokens, 1)

        # down projections first: their input scaling divides the columns of the up projection before them
        down = {}
        for node, w in zip(targets, weights):
            if node.name in products:
                down[node.name] = scaled_gptq(*inputs_of(node, w))
                if down[node.name][0] is not None:
                    feeder, offset, width = products[node.name]
                    up_columns[feeder] = (offset, width, down[node.name][0])
        for i, (node, w) in enumerate(zip(targets, weights)):
            target, hessian = inputs_of(node, w)
            if node.name in up_columns:  # x (W / s) over the up columns: the down projection reads act ⊙ up / s
                offset, width, col_scale = up_columns[node.name]
                target = target.copy()
                target[:, offset:offset + width] /= col_scale
            if node.name in down:
                _, quant, target, hessian = down[node.name]
            elif node.name in norms:  # 1/s folded into the norm's gamma
                scale, quant, target, hessian = scaled_gptq(target, hessian)
                if scale is not None:
                    scaled_gammas[norms[node.name]] = scale
            elif algorithm == "gptq":
                quant = gptq(target, hessian, block, symmetric, **gptq_options)
            else:
                quant = search(target, np.diagonal(hessian), block, symmetric)
            errors["rtn"] += output_error(target, rtn(target, block, symmetric), hessian)
            errors[algorithm] += output_error(target, quant, hessian)
            made, made_inits = to_matmulnbits(node, node.input[1], quant, w.shape[0], accuracy_level)
            replaced[positions[i]] = made
            new_inits += made_inits
            if progress and (i + 1) % 20 == 0:
                progress(f"  {algorithm}: {i + 1}/{len(targets)} MatMuls")
        return replaced, new_inits, errors

    def apply(into, replaced, new_inits):
        for tensor in into.graph.initializer:  # the scaled inputs' norms divide by s
            if tensor.name in scaled_gammas:
                gamma = numpy_helper.to_array(tensor).astype(np.float32) / scaled_gammas[tensor.name]
                tensor.CopyFrom(numpy_helper.from_array(gamma.astype(np.float32), tensor.name))
        nodes = [replaced.get(i, node) for i, node in enumerate(into.graph.node)]
        del into.graph.node[:]
        into.graph.node.extend(nodes)
        into.graph.initializer.extend(new_inits)
        used = {i for n in into.graph.node for i in n.input}
        old_weights = {n.input[1] for n in targets}
        keep = [t for t in into.graph.initializer if t.name in used or t.name not in old_weights]
        del into.graph.initializer[:]
        into.graph.initializer.extend(keep)
        if not any(o.domain == "com.microsoft" for o in into.opset_import):
            from onnx import helper

            into.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return into

    replaced, new_inits, errors = quantize_all(sums)
    for _ in range(passes - 1):
        import onnx

        quantized = onnx.ModelProto()
        quantized.CopyFrom(model)
        apply(quantized, replaced, new_inits)
        sums, tokens = collect_hessians(model, package_dir, inputs, progress=progress, answer_tokens=answer_tokens,
                                        quantized=quantized)
        del quantized
        replaced, new_inits, errors = quantize_all(sums)
    model = apply(model, replaced, new_inits)
    summary = {"tokens": tokens, "nodes": len(targets), "output_error": errors,
               "scaled": len(scaled_gammas) + len(up_columns)}  # each gamma and each up slice serves one MatMul
    return model, summary


def _scalable_norms(model, targets, inits) -> dict[str, str]:
    """{MatMul name: gamma initializer} for the targets whose input is a (Skip)SimplifiedLayerNormalization's first
    output read by that MatMul alone, with a gamma of its own: there an input scaling folds into gamma exactly."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    gamma_uses = {name: len(nodes) for name, nodes in consumers.items()}
    producers = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for node in targets:
        if "lm_head" in node.name:  # a tied checkpoint's table is shared with the embeddings: never rescaled
            continue
        norm = producers.get(node.input[0])
        if norm is None or norm.op_type not in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            continue
        gamma = norm.input[2] if norm.op_type == "SkipSimplifiedLayerNormalization" else norm.input[1]
        if norm.output[0] == node.input[0] and len(consumers[node.input[0]]) == 1 and gamma in inits \
                and gamma_uses.get(gamma) == 1:
            found[node.name] = gamma
    return found


def _scalable_products(model, targets, inits) -> dict[str, tuple[str, int, int]]:
    """{down MatMul name: (gate_up MatMul name, offset, width)} for the targets that read Mul(act(gate), up) where
    gate and up are a Split of one target MatMul's output: an input scaling of the down projection folds exactly
    into the up columns [offset, offset + width) of that MatMul's weight."""
    from onnx import numpy_helper

    producers = {out: node for node in model.graph.node for out in node.output}
    names = {node.name for node in targets}
    found = {}
    for node in targets:
        mul = producers.get(node.input[0])
        if mul is None or mul.op_type != "Mul":
            continue
        split = next((producers[i] for i in mul.input if i in producers and producers[i].op_type == "Split"), None)
        if split is None or len(split.output) != 2 or len(split.input) < 2 or split.input[1] not in inits:
            continue
        up = split.output[1]
        act = producers.get(next((i for i in mul.input if i != up), ""))
        if up not in mul.input or act is None or act.input[0] != split.output[0]:
            continue
        feeder = producers.get(split.input[0])
        sizes = numpy_helper.to_array(inits[split.input[1]])
        if feeder is None or feeder.op_type != "MatMul" or feeder.name not in names or len(sizes) != 2:
            continue
        found[node.name] = (feeder.name, int(sizes[0]), int(sizes[1]))
    return found


def calibration_package(options, source):
    """The fp32 package a calibrated int4 algorithm calibrates on: `options.int4_calibration_package`, else the
    folder the graph file `source` lies in; None when that folder holds no package (no model.json)."""
    from pathlib import Path

    package = options.int4_calibration_package or (Path(source).parent if source is not None else None)
    return package if package is not None and (Path(package) / "model.json").is_file() else None


def quantize_for_options(model, options, exclude, source, progress=None, **overrides) -> tuple[object, str]:
    """`quantize_matmuls` for export/quantize.py's QuantOptions (int4_algorithm "search" / "gptq"): calibrates on
    `options.int4_calibration_package`, else on the package the graph file `source` lies in. → (model, the
    method's description)."""
    from pathlib import Path

    from .quantize import QuantizationError

    package = calibration_package(options, source)
    if package is None:
        folder = options.int4_calibration_package or (Path(source).parent if source is not None else None)
        raise QuantizationError(f"int4_algorithm={options.int4_algorithm!r} calibrates on the fp32 package the "
                                f"decoder belongs to: no model.json in {folder} (set int4_calibration_package)")
    if options.int4_algorithm == "gptq":
        overrides["gptq_options"] = {"act_order": options.int4_act_order, **(overrides.get("gptq_options") or {})}
        overrides.setdefault("scale_alphas", options.int4_scale_alphas)
        overrides.setdefault("scale_select", options.int4_scale_select)
    model, summary = quantize_matmuls(model, algorithm=options.int4_algorithm, block=options.block_size,
                                      symmetric=options.symmetric, accuracy_level=options.accuracy_level,
                                      package_dir=package, exclude=exclude, progress=progress, **overrides)
    errors = summary["output_error"]
    ratio = errors[options.int4_algorithm] / errors["rtn"] if errors["rtn"] else 1.0
    name = {"search": "importance-weighted block search",
            "gptq": "GPTQ, act order" if options.int4_act_order else "GPTQ"}[options.int4_algorithm]
    if summary.get("scaled"):
        name += f", activation-aware input scaling on {summary['scaled']} MatMuls"
    return model, f"{name} (calibrated on {summary['tokens']} tokens; output error {ratio:.0%} of RTN's)"
