"""Train the demo Idefics3 model on CPU (torch), from scratch, on generated shapes data.

Recipe (one stage, two losses):
- the VLM loss: next-token cross-entropy on the answer tokens (and the closing `<end_of_utterance>`) of SmolVLM
  chat-formatted prompts, image tokens laid out exactly as the runtime lays them out for an unsplit image;
- a dense auxiliary loss that gives the vision tower a direct signal (the "pretrain the vision tower as a
  classifier" idea, done jointly): a linear head on every vision patch (12×12 per tile) predicts the shape and the
  colour of the object under the patch centre (or background). The head is dropped at export.

The vision features of an image are computed once and reused for several questions about it (passed to the HF
model as `image_hidden_states`), so each image gives several answer losses for one vision forward pass.

Pixel values come from `edgevlm.runtime.preprocess.idefics3.preprocess` with the package's preprocessor config,
which matches the HF processor bit for bit, so train and serve inputs are identical.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.runtime.preprocess.idefics3 import Idefics3ImageConfig, preprocess

from ..random_model import TinyDims, shrink_config

from . import data as D
from .tokenizer import FIXTURE, token_ids, train_tokenizer, write_tokenizer_files

PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_image_splitting": False,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Idefics3ImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "max_image_size": {"longest_edge": D.TILE},
    "processor_class": "Idefics3Processor",
    "resample": 1,
    "rescale_factor": 1 / 255,
    "size": {"longest_edge": D.TILE},
}


@dataclass(frozen=True)
class Dims(TinyDims):
    """The demo model's widths: one 96 px tile (no splitting), 16 image tokens."""

    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 384
    image_size: int = D.TILE
    patch_size: int = 8
    scale_factor: int = 3  # 12×12 patches → 16 image tokens
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 6
    text_kv_heads: int = 2
    text_intermediate: int = 512
    max_positions: int = 512
    longest_edge_tiles: int = 1


@dataclass
class TrainConfig:
    seed: int = 1234
    steps: int = 2600
    images_per_batch: int = 32
    questions_per_image: int = 3
    text_only_per_batch: int = 4
    lr: float = 1.5e-3
    vision_lr: float = 2.5e-3
    warmup: int = 200
    min_lr_frac: float = 0.03
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    eval_every: int = 250
    eval_seed: int = 99_000_001  # teacher-forced progress set (not the benchmark's seeds)
    eval_size: int = 420
    eval_json: int = 60  # JSON questions added to the progress set (seed eval_seed + 1)
    threads: int = 2
    max_minutes: float = 1e9  # wall-clock cap; the LR decay follows it when it binds


# Question-type sampling weights for training (harder, multi-shape types more often).
# "json" (one-shape images only) gets a modest share: ~12% of the questions on one-shape images, ~4% of all.
QTYPE_WEIGHTS = {"shape": 1.0, "colour": 0.7, "colour_of_shape": 1.3, "count": 1.0, "position": 1.6,
                 "describe": 1.6, D.JSON_QTYPE: 1.0}


def model_config(ids: dict, dims: Dims) -> dict:
    cfg = json.loads((FIXTURE / "config.json").read_text())
    shrink_config(cfg, dims)
    text = cfg["text_config"]
    text.update(vocab_size=ids["vocab_size"], bos_token_id=ids["bos"], eos_token_id=ids["im_end"],
                pad_token_id=ids["im_end"], torch_dtype="float32")
    text.pop("_flash_attn_2_enabled", None)
    cfg.update(image_token_id=ids["image"], vocab_size=ids["vocab_size"],
               torch_dtype="float32", pad_token_id=ids["im_end"])
    return cfg


def build_model(ids: dict, dims: Dims):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    config = Idefics3Config(**model_config(ids, dims))
    config._attn_implementation = "sdpa"
    return Idefics3ForConditionalGeneration(config)


class AuxHead(nn.Module):
    """Auxiliary classifiers that give the vision tower a direct signal (dropped at export).

    - per vision patch (12×12): shape (background + 4) and colour (background + 8) of the object under the patch;
    - per image token after the connector (4×4, in the text embedding space): the shape and colour of the object
      covering most of the token's 3×3 patches, and the token's own grid cell (so the features carry where they
      are, which the position questions need).
    """

    def __init__(self, vision_hidden: int, text_hidden: int, tokens: int):
        super().__init__()
        self.shape = nn.Linear(vision_hidden, 1 + len(D.SHAPES))
        self.color = nn.Linear(vision_hidden, 1 + len(D.COLOR_NAMES))
        self.tok_shape = nn.Linear(text_hidden, 1 + len(D.SHAPES))
        self.tok_color = nn.Linear(text_hidden, 1 + len(D.COLOR_NAMES))
        self.tok_cell = nn.Linear(text_hidden, tokens)

    def loss(self, hidden, feats, shape_labels, color_labels, scale: int):
        """hidden [N, P, Hv], feats [N, T, D]; labels [N, P] (0 = background)."""
        shape_logits, color_logits = self.shape(hidden), self.color(hidden)
        fg = shape_labels > 0
        # Shape only where there is an object: background patches would swamp the signal.
        loss = F.cross_entropy(shape_logits[fg], shape_labels[fg]) if fg.any() else shape_logits.sum() * 0
        loss = loss + F.cross_entropy(color_logits.flatten(0, 1), color_labels.flatten())
        n, p = shape_labels.shape
        side = int(round(p ** 0.5))
        t_side = side // scale
        tok_shape, tok_color = token_labels(shape_labels.view(n, side, side), color_labels.view(n, side, side), scale)
        ts, tc = self.tok_shape(feats), self.tok_color(feats)
        tfg = tok_shape > 0
        if tfg.any():
            loss = loss + F.cross_entropy(ts[tfg], tok_shape[tfg])
        loss = loss + F.cross_entropy(tc.flatten(0, 1), tok_color.flatten())
        cells = torch.arange(t_side * t_side).repeat(n)
        loss = loss + 0.5 * F.cross_entropy(self.tok_cell(feats).flatten(0, 1), cells)
        return loss


def token_labels(shape_grid, color_grid, scale: int):
    """Majority non-background label of each token's scale×scale patches (background if none)."""
    n, side, _ = shape_grid.shape
    t = side // scale
    blocks_s = shape_grid.view(n, t, scale, t, scale).permute(0, 1, 3, 2, 4).reshape(n, t * t, scale * scale)
    blocks_c = color_grid.view(n, t, scale, t, scale).permute(0, 1, 3, 2, 4).reshape(n, t * t, scale * scale)
    # Count each joint (shape, colour) label; pick the most frequent non-background one.
    joint = blocks_s * 16 + blocks_c
    onehot = F.one_hot(joint, 16 * 16).sum(2)
    onehot[..., 0] = 0
    best = onehot.argmax(-1)
    has = onehot.max(-1).values > 0
    return torch.where(has, best // 16, 0), torch.where(has, best % 16, 0)


class Encoder:
    """Chat-formatted token ids, as the runtime builds them (SmolVLM template, unsplit image layout)."""

    def __init__(self, tok, image_seq_len: int):
        self.tok = tok
        self.image_block = "<fake_token_around_image><global-img>" + "<image>" * image_seq_len + \
                           "<fake_token_around_image>"
        self.eou = tok.token_to_id("<end_of_utterance>")
        self._cache: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self.tok.encode(text, add_special_tokens=False).ids
        return ids

    def prompt_text(self, question: str, image: bool, text_first: bool = False) -> str:
        if not image:
            return f"<|im_start|>User: {question}<end_of_utterance>\nAssistant:"
        if text_first:
            return f"<|im_start|>User: {question}{self.image_block}<end_of_utterance>\nAssistant:"
        return f"<|im_start|>User:{self.image_block}{question}<end_of_utterance>\nAssistant:"

    def pair(self, question: str, answer: str, image: bool, text_first: bool = False):
        prompt = self._enc(self.prompt_text(question, image, text_first))
        # JSON answers start right after "Assistant:" with no space: constrained decoding emits compact JSON with
        # no whitespace outside strings, so the first token the grammar allows is '{"', never ' {"'.
        ans = self._enc(answer if answer.startswith("{") else " " + answer) + [self.eou]
        return prompt, ans


def pixels_of(images, image_config: Idefics3ImageConfig) -> torch.Tensor:
    out = [preprocess([im], image_config).pixel_values[0] for im in images]  # each [1, 3, 96, 96]
    return torch.from_numpy(np.concatenate(out, axis=0))  # [N, 3, 96, 96]


def scene_labels(scene: D.Scene) -> tuple[np.ndarray, np.ndarray]:
    lab = scene.labels.reshape(-1)
    shape_map = np.array([0] + [1 + D.SHAPES.index(s.kind) for s in scene.shapes])
    color_map = np.array([0] + [1 + D.COLOR_NAMES.index(s.color) for s in scene.shapes])
    return shape_map[lab], color_map[lab]


def make_batch(rng: random.Random, enc: Encoder, cfg: TrainConfig, image_config, pad_id: int):
    scenes = [D.make_scene(rng) for _ in range(cfg.images_per_batch)]
    seqs = []  # (prompt, answer) in order: image sequences grouped by image, then text-only
    for sc in scenes:
        valid = D.valid_qtypes(sc)
        weights = [QTYPE_WEIGHTS[q] for q in valid]
        for _ in range(cfg.questions_per_image):
            qa = D.questions_for(sc, rng, rng.choices(valid, weights)[0])
            seqs.append(enc.pair(qa.question, qa.answer, True, text_first=rng.random() < 0.1))
    for _ in range(cfg.text_only_per_batch):
        qa = D.smalltalk(rng) if rng.random() < 0.75 else D.no_image_question(rng)
        seqs.append(enc.pair(qa.question, qa.answer, False))
    input_ids, labels, mask = collate(seqs, pad_id)
    sl, cl = zip(*(scene_labels(s) for s in scenes))
    return {
        "pixel_values": pixels_of([s.image for s in scenes], image_config),
        "input_ids": input_ids, "labels": labels, "attention_mask": mask,
        "shape_labels": torch.from_numpy(np.stack(sl)), "color_labels": torch.from_numpy(np.stack(cl)),
    }


def collate(seqs, pad_id: int):
    n = max(len(p) + len(a) for p, a in seqs)
    input_ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        ids = p + a
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(p): len(ids)] = torch.tensor(a)
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def vision_forward(model, pixel_values: torch.Tensor):
    """(patch hidden states [N, 144, Hv], image features [N, 16, D]) for N unpadded 96×96 tiles."""
    n, _, h, w = pixel_values.shape
    p = model.config.vision_config.patch_size
    patch_mask = torch.ones((n, h // p, w // p), dtype=torch.bool)
    hidden = model.model.vision_model(pixel_values=pixel_values, patch_attention_mask=patch_mask).last_hidden_state
    return hidden, model.model.connector(hidden)


def lm_forward(model, input_ids, attention_mask, features, repeat: int):
    feats = features.repeat_interleave(repeat, dim=0) if repeat > 1 else features
    out = model(input_ids=input_ids, attention_mask=attention_mask, image_hidden_states=feats, use_cache=False)
    return out.logits


def answer_correct(logits, labels) -> torch.Tensor:
    """Per sequence: every answer token is the argmax (teacher forced) — equals greedy exact match."""
    pred = logits[:, :-1].argmax(-1)
    gold = labels[:, 1:]
    ok = (pred == gold) | (gold == -100)
    return ok.all(dim=1)


class ProgressSet:
    """A fixed teacher-forced evaluation set (per question type), cheap enough to run every few minutes."""

    def __init__(self, enc: Encoder, cfg: TrainConfig, image_config, pad_id: int):
        samples = D.eval_samples(cfg.eval_seed, cfg.eval_size)
        if cfg.eval_json:
            samples += D.json_eval_samples(cfg.eval_seed + 1, cfg.eval_json)
        self.qtypes = [s.qtype for s in samples]
        self.img_idx = [i for i, s in enumerate(samples) if s.scene is not None]
        self.txt_idx = [i for i, s in enumerate(samples) if s.scene is None]
        self.pixels = pixels_of([samples[i].scene.image for i in self.img_idx], image_config)
        seqs = [enc.pair(s.question, s.answer, s.scene is not None) for s in samples]
        order = self.img_idx + self.txt_idx
        self.input_ids, self.labels, self.mask = collate([seqs[i] for i in order], pad_id)
        self.order = order

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        model.eval()
        correct = []
        for start in range(0, len(self.order), 140):
            sl = slice(start, start + 140)
            idx = [i for i in range(start, min(start + 140, len(self.order)))]
            n_img = sum(1 for i in idx if i < len(self.img_idx))
            feats = None
            if n_img:
                _, feats = vision_forward(model, self.pixels[idx[0]: idx[0] + n_img])
            out = model(input_ids=self.input_ids[sl], attention_mask=self.mask[sl], image_hidden_states=feats,
                        use_cache=False)
            correct.append(answer_correct(out.logits, self.labels[sl]))
        correct = torch.cat(correct).tolist()
        model.train()
        per: dict[str, list[bool]] = {}
        for pos, i in enumerate(self.order):
            per.setdefault(self.qtypes[i], []).append(correct[pos])
        res = {q: sum(v) / len(v) for q, v in per.items()}
        res["overall"] = sum(correct) / len(correct)
        return res


def lr_at(step: int, cfg: TrainConfig, minutes: float = 0.0) -> float:
    """Warmup, then cosine decay over the steps — or over `max_minutes` if time runs out first (a safety net
    for slower machines: the decay then follows the wall clock, so a cut-short run still ends annealed)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    t = max(t, minutes / cfg.max_minutes)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def save_checkpoint(model, work: Path, name: str) -> Path:
    """A complete HF checkpoint folder (model + tokenizer + processor configs) that `edgevlm export` takes."""
    out = work / name
    tmp = work / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
              "preprocessor_config.json", "processor_config.json"):
        shutil.copyfile(work / "tokenizer" / f, tmp / f)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def prepare_work(work: Path, dims: Dims) -> tuple[object, dict]:
    """Tokenizer and processor files under work/tokenizer; returns (tokenizer, ids)."""
    tdir = work / "tokenizer"
    tok = train_tokenizer()
    ids = write_tokenizer_files(tdir, tok)
    (tdir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    image_seq_len = (D.TILE // dims.patch_size) ** 2 // dims.scale_factor ** 2
    (tdir / "processor_config.json").write_text(
        json.dumps({"image_seq_len": image_seq_len, "processor_class": "Idefics3Processor"}, indent=2) + "\n")
    return tok, ids


def train(work: str | Path, cfg: TrainConfig | None = None, dims: Dims | None = None, log=None) -> dict:
    log = log or (lambda msg: print(msg, flush=True))
    cfg, dims = cfg or TrainConfig(), dims or Dims()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok, ids = prepare_work(work, dims)
    image_config = Idefics3ImageConfig.from_dict(PREPROCESSOR)
    model = build_model(ids, dims)
    model.generation_config.bos_token_id = ids["bos"]
    model.generation_config.eos_token_id = ids["eou"]
    model.generation_config.pad_token_id = ids["im_end"]
    image_seq_len_ = (D.TILE // dims.patch_size) ** 2 // dims.scale_factor ** 2
    aux = AuxHead(dims.vision_hidden, dims.text_hidden, image_seq_len_)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters; vocab {ids['vocab_size']}; config {asdict(dims)}")
    log(f"train config: {asdict(cfg)}")

    image_seq_len = (D.TILE // dims.patch_size) ** 2 // dims.scale_factor ** 2
    enc = Encoder(tok, image_seq_len)
    pad_id = ids["im_end"]
    vision_params = list(model.model.vision_model.parameters()) + list(aux.parameters())
    vision_ids = {id(p) for p in vision_params}
    other = [p for p in model.parameters() if id(p) not in vision_ids]
    opt = torch.optim.AdamW([{"params": vision_params, "lr": cfg.vision_lr, "base": cfg.vision_lr},
                             {"params": other, "lr": cfg.lr, "base": cfg.lr}],
                            betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    progress = ProgressSet(enc, cfg, image_config, pad_id)
    rng = random.Random(cfg.seed)
    curve = []
    best = -1.0
    t0 = time.time()
    lm_ema = aux_ema = None
    for step in range(cfg.steps):
        scale = lr_at(step, cfg, (time.time() - t0) / 60)
        for g in opt.param_groups:
            g["lr"] = g["base"] * scale
        batch = make_batch(rng, enc, cfg, image_config, pad_id)
        hidden, image_feats = vision_forward(model, batch["pixel_values"])
        feats = image_feats.repeat_interleave(cfg.questions_per_image, dim=0)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    image_hidden_states=feats, use_cache=False)
        logits = out.logits[:, :-1]
        gold = batch["labels"][:, 1:]
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gold.reshape(-1), ignore_index=-100)
        aux_loss = aux.loss(hidden, image_feats, batch["shape_labels"], batch["color_labels"], dims.scale_factor)
        loss = lm_loss + cfg.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters()), 1.0)
        opt.step()
        lm_ema = lm_loss.item() if lm_ema is None else 0.95 * lm_ema + 0.05 * lm_loss.item()
        aux_ema = aux_loss.item() if aux_ema is None else 0.95 * aux_ema + 0.05 * aux_loss.item()
        if step % 50 == 0:
            el = time.time() - t0
            log(f"step {step} lm {lm_ema:.4f} aux {aux_ema:.4f} lr×{scale:.3f} {el / 60:.1f} min "
                f"({el / (step + 1):.2f} s/step)")
        last = step == cfg.steps - 1 or (time.time() - t0) / 60 > cfg.max_minutes
        if (step + 1) % cfg.eval_every == 0 or last:
            res = progress.evaluate(model)
            el = (time.time() - t0) / 60
            curve.append({"step": step + 1, "minutes": round(el, 2), **{k: round(v, 4) for k, v in res.items()}})
            log("eval step %d (%.1f min): " % (step + 1, el) + " ".join(f"{k} {v:.3f}" for k, v in res.items()))
            save_checkpoint(model, work, "last")
            if res["overall"] >= best:
                best = res["overall"]
                save_checkpoint(model, work, "best")
                log(f"  saved best ({best:.3f})")
            (work / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
        if last:
            break
    return {"curve": curve, "minutes": (time.time() - t0) / 60, "best": best, "params": n_params}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/demo-work")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--max-minutes", type=float, default=1e9)
    a = ap.parse_args()
    train(a.work, TrainConfig(steps=a.steps, max_minutes=a.max_minutes))
