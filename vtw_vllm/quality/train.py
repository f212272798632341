"""Train a tiny LLaVA-1.5-shaped model on the synthetic shapes VQA task (CPU).

    make train-vqa     # the one run that made checkpoints/vqa-tiny (~47 min here)

    python -m vtw_vllm.quality.train --out DIR [--steps ...] [--probe-weight 0.5]
    python -m vtw_vllm.quality.train --init-from DIR --out ... [options]   # continue

STATUS: see the "Accuracy" section of the README and ``checkpoints/vqa-tiny/training.log``
for what the shipped model reaches. The previous model (four runs without
``--probe-weight``) plateaued at 85.5-87%: its vision tokens had lost the shape and grid
cell the vision stage taught (``benchmarks/quality/probe_vision.py``: shape at the
majority-label rate, cell 22% vs 12.6%), and more language-model steps did not help
(``benchmarks/README.md``).

Why: VTW's accuracy/K trade-off can only be measured on a model that reads its image;
random-init fixtures do not. This trains the *whole* model (CLIP-style tower with patch
14 at 336 px, so 576 vision tokens; 2-layer GELU MLP projector; 8-layer Llama with GQA)
from scratch, then saves it in the llava-hf layout through the fixture builder's code
(same tokenizer, processor, chat template and ``vision_tower.vision_model.`` key rename),
so stock vLLM and the VTW plugin load it like a hub checkpoint.

What made it learn (each measured here; before them every run sat at the answer priors):

- Packed single-turn rows (:meth:`Encoder.packed`): one image, 24 questions, each
  attending to the image prefix and itself only, at its evaluation positions. A plain
  multi-turn dialogue lets later answers be read from earlier ones (text shortcuts).
- Learning rate 1e-3 (with perfect vision features fed in, 3e-3 learnt several times
  slower) and a 0.05 init for the 128-wide language model.
- A vision stage (:func:`align_vision`) with per-patch targets, and a within-cell head
  in the tower's last read layer (:func:`informative_vision_init`): the tower then
  names each covered patch's shape (96% here), which it never learnt otherwise.
- The vision stage's probe kept on as an auxiliary loss through stage 2
  (``--probe-weight 0.5``, :class:`VisionProbe`): the tokens keep naming each patch's
  shape and cell (probe 100% shape on covered patches to the end); without it they lost
  both and accuracy plateaued at ~87%.
- Sparse vision tokens (:func:`kept_patches`): 4 random tokens per grid cell, at their
  own positions, for all but the last steps, which use all 576. With 576 tokens from
  the start, the language model was at 44% after 500 steps (7 min).

Loss: teacher-forced cross-entropy on the answer tokens and their ``</s>``.
Deterministic from ``--seed`` and ``--data-start`` (CPU float32, fixed thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vtw_vllm.quality import task
from vtw_vllm.testing import fixtures

NUM_IMAGE_TOKENS = 576
PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5 (v1 conversation) format


def build_config(tokenizer: PreTrainedTokenizerFast, init_std: float = 0.05) -> LlavaConfig:
    """The fixture's LLaVA-1.5 shape with a trainable init and a slightly deeper tower."""
    text = fixtures._text_config(tokenizer)  # hidden 128, 8 layers, 4 heads, 2 KV heads
    text.initializer_range = init_std
    vision = fixtures._vision_config()  # hidden 64, patch 14 at 336 px: 576 patches
    vision.num_hidden_layers = 3  # LLaVA reads layer -2: two layers are used
    vision.initializer_range = 0.02
    common = {**fixtures._common_config(tokenizer), "text_config": text, "vision_config": vision}
    return LlavaConfig(**common, image_seq_length=NUM_IMAGE_TOKENS)


def informative_vision_init(model: LlavaForConditionalGeneration) -> None:
    """Start the tower from features a ViT learns first: mean colour, grid cell and a
    within-cell attention head.

    Trained from random init, the tiny model first learns the answers' priors and only
    finds its image after thousands of steps (its loss sits at the prior for hundreds of
    steps here). So three channels of the patch embedding start as each patch's mean
    R, G, B, and nine dimensions of the position embedding as a one-hot of the patch's
    grid cell. Everything stays trainable; the model still has to learn to find and read
    the right vision tokens, which is what VTW is measured on.
    """
    embeddings = model.model.vision_tower.embeddings
    side = task.IMAGE_SIZE // fixtures._PATCH_SIZE  # 24 patches
    per_cell = side // task.GRID  # 8 patches
    with torch.no_grad():
        weight = embeddings.patch_embedding.weight  # [hidden, 3, 14, 14]
        weight[:3].zero_()
        for c in range(3):
            weight[c, c] = 3.0 / weight[c, c].numel()  # 3 x the patch's mean channel value
        position = embeddings.position_embedding.weight  # [1 + 576, hidden]; row 0 is CLS
        position[:, 3:12].zero_()
        for patch in range(side * side):
            row, col = divmod(patch, side)
            position[1 + patch, 3 + (row // per_cell) * task.GRID + col // per_cell] = 3.0
        # Head 0 of the last layer LLaVA reads attends within its grid cell: its queries
        # and keys are the cell one-hot, so every patch starts out seeing a summary of its
        # whole cell, as a pretrained ViT's patches see their object. Shape is not a
        # property of one 14 px patch (its inside is one flat colour): the first layer
        # finds local evidence (edges), this head spreads it over the cell. Without it, or
        # with it in the first layer, the tower stayed at chance on shape for 1000 steps.
        layer = model.config.vision_config.num_hidden_layers - 2  # the last layer LLaVA reads
        attention = model.model.vision_tower.encoder.layers[layer].self_attn
        head_dim = attention.head_dim
        for proj in (attention.q_proj, attention.k_proj):
            proj.weight[:head_dim].zero_()
            proj.bias[:head_dim].zero_()
            for cell in range(task.GRID * task.GRID):
                proj.weight[cell, 3 + cell] = 3.0
    # The projector's output starts 10x larger than its 0.02-std init gives: otherwise the
    # image-dependent part of each vision token is drowned in the residual stream of the
    # deeper layers, and even "what colour is this one-colour image?" took 100+ steps
    # here instead of 30.
    model.model.multi_modal_projector.linear_2.weight.data.mul_(10.0)


def grid_cell_of_tokens() -> torch.Tensor:
    """[576]: the 3x3 grid cell (0..8, row-major) of each vision token (24x24 raster)."""
    side = task.IMAGE_SIZE // fixtures._PATCH_SIZE  # 24 patches
    per_cell = side // task.GRID  # 8
    rows, cols = torch.arange(side * side) // side, torch.arange(side * side) % side
    return (rows // per_cell) * task.GRID + cols // per_cell


def image_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The projected vision tokens, [B, 576, hidden], as the language model receives them."""
    features = model.model.get_image_features(
        pixel_values=pixels,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    ).pooler_output
    return torch.stack(list(features))


def object_patches(images: list[Image.Image]) -> torch.Tensor:
    """[B, 576] bool: the patches at least half covered by a shape (not background)."""
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images]))  # [B, H, W, 3]
    covered = (pixels != torch.tensor(task.BACKGROUND, dtype=pixels.dtype)).any(-1).float()
    patch = fixtures._PATCH_SIZE
    fraction = torch.nn.functional.avg_pool2d(covered[:, None], patch, patch)  # [B, 1, 24, 24]
    return fraction.flatten(1) >= 0.5


def scene_labels(scenes: list[task.Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid cell: colour index (0 = empty, 1.. = COLOURS) and shape index (0 = empty),
    [B, 9] each: the targets of the vision alignment stage."""
    colours, shapes = list(task.COLOURS), list(task.SHAPES)
    colour = torch.zeros(len(scenes), task.GRID * task.GRID, dtype=torch.long)
    shape = torch.zeros_like(colour)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            cell = obj.row * task.GRID + obj.col
            colour[b, cell] = 1 + colours.index(obj.colour)
            shape[b, cell] = 1 + shapes.index(obj.shape)
    return colour, shape


class VisionProbe(torch.nn.Module):
    """A linear probe on each projected vision token: its grid cell and, on a patch at least
    half covered by a shape, that shape's colour and kind (else colour "empty").

    The vision stage trains the tower through it; with ``--probe-weight`` it stays on as an
    auxiliary loss in stage 2. Why: without it, the previous model's tokens lost the shape
    and cell the vision stage taught (``benchmarks/quality/probe_vision.py``: shape at the
    majority-label rate, cell 22%) and accuracy plateaued near 87%.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.sizes = [1 + len(task.COLOURS), 1 + len(task.SHAPES), task.GRID**2]
        self.linear = torch.nn.Linear(hidden, sum(self.sizes))
        self.register_buffer("cell_of_token", grid_cell_of_tokens(), persistent=False)

    def loss(
        self, features: torch.Tensor, scenes: list[task.Scene], images: list[Image.Image]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed cross-entropy of the three targets, and accuracies on the covered patches."""
        logits = self.linear(torch.nn.functional.rms_norm(features, (self.hidden,)))
        on_object = object_patches(images)
        colour, shape = (
            labels[:, self.cell_of_token] * on_object for labels in scene_labels(scenes)
        )
        cell = self.cell_of_token.expand_as(colour)
        colour_logits, shape_logits, cell_logits = logits.split(self.sizes, -1)
        ce = torch.nn.functional.cross_entropy
        loss = (
            ce(colour_logits.flatten(0, 1), colour.flatten())
            + ce(shape_logits.flatten(0, 1), shape.masked_fill(~on_object, -100).flatten())
            + ce(cell_logits.flatten(0, 1), cell.flatten())
        )
        hits = {
            "colour": colour_logits.argmax(-1) == colour,
            "shape": shape_logits.argmax(-1) == shape,
            "cell": cell_logits.argmax(-1) == cell,
        }
        hits["all"] = hits["colour"] & hits["shape"] & hits["cell"]
        return loss, {k: v[on_object].float().mean().item() for k, v in hits.items()}


def align_vision(
    model: LlavaForConditionalGeneration,
    probe: VisionProbe,
    enc: Encoder,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Stage 1, as LLaVA's feature-alignment stage prepares its projector: train the vision
    tower and projector so that every projected vision token names its grid cell and, on
    a patch at least half covered by a shape, that shape's colour and kind, through
    ``probe`` (kept for stage 2's ``--probe-weight``, else discarded).

    Why: trained end to end from scratch, the language model sits at the answer priors
    for hundreds of steps (observed here) before it finds its image; with vision tokens
    that already carry the scene, the values it reads are informative from the start.
    Stage 2 trains every weight, the vision side included.
    """
    params = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
        *probe.parameters(),
    ]
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.0)
    seed = task.HELD_OUT_SEED // 2  # scenes apart from stage 2's seeds, below the held-out
    hits: dict[str, float] = {}
    for step in range(args.vision_steps):
        scenes = [task.sample_scene(seed + i)[0] for i in range(args.vision_batch_size)]
        seed += args.vision_batch_size
        images = [s.render() for s in scenes]
        loss, hits = probe.loss(image_features(model, enc.pixel_values(images)), scenes, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0:
            parts = " ".join(f"{k} {v:.3f}" for k, v in hits.items())
            print(f"vision step {step + 1} loss {loss.item():.4f} ({parts})", flush=True)
    return {"vision_loss": loss.item(), "vision_token_accuracy": hits["all"]}


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(**fixtures._image_processor_kwargs())
    return LlavaProcessor(image_processor, tokenizer, **fixtures._processor_kwargs())


class Encoder:
    """Token ids and pixel values exactly as vLLM's LLaVA processor would produce them."""

    def __init__(self, processor: LlavaProcessor) -> None:
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(fixtures.IMAGE_TOKEN)
        ip = processor.image_processor
        self.mean = np.asarray(ip.image_mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(ip.image_std, dtype=np.float32)[:, None, None]
        self._processor = ip

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """[B, 3, 336, 336]. The task's images are already 336x336, so the CLIP processor's
        resize and centre crop are the identity: only rescale and normalise remain (5x
        faster than calling it; :meth:`check` asserts the equality)."""
        arrays = [np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0 for im in images]
        return torch.from_numpy((np.stack(arrays) - self.mean) / self.std)

    def check(self, images: list[Image.Image]) -> None:
        expected = self._processor(images, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(self.pixel_values(images), expected, atol=1e-5, rtol=0)

    def single_turn(self, qa: task.QA) -> tuple[list[int], list[int]]:
        """Single-turn rows for the held-out check: (input_ids with the image expanded to 576
        tokens, labels; -100 = no loss)."""
        prompt = self.expand(self.tokenizer(PROMPT.format(question=qa.question))["input_ids"])
        reply = self.reply(qa)
        return prompt + reply, [-100] * len(prompt) + reply

    def expand(self, ids: list[int]) -> list[int]:
        at = ids.index(self.image_token_id)
        return ids[:at] + [self.image_token_id] * NUM_IMAGE_TOKENS + ids[at + 1 :]

    def reply(self, qa: task.QA) -> list[int]:
        ids = self.tokenizer(" " + qa.answer, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    def packed(self, qas: list[task.QA], kept: list[int] | None = None) -> Packed:
        """One image, many questions, each seeing exactly its single-turn prompt.

        The shared prefix ``<s>USER: <image>\\n`` is stored once; each question's
        ``{q} ASSISTANT: {a}</s>`` follows as its own segment whose positions restart where
        the prefix ends and which attends to the prefix and itself only. So every segment
        is token-for-token and position-for-position the evaluation prompt, and no answer
        can be read from another question's text (in a plain multi-turn dialogue, later
        answers leak from earlier ones, a shortcut that trains text copying, not looking).

        ``kept``: the vision tokens (patch indices) to keep, each at its own position, the
        others dropped (see :func:`kept_patches`); None keeps all 576.
        """
        first = self.tokenizer(PROMPT.format(question=qas[0].question))["input_ids"]
        at = first.index(self.image_token_id)
        cut = at + 2  # up to and including the "\n"
        prefix = self.expand(first[:cut])
        positions = list(range(len(prefix)))
        if kept is not None:
            prefix = prefix[:at] + [self.image_token_id] * len(kept) + prefix[-1:]
            positions = [*range(at), *(at + p for p in kept), positions[-1]]
        ids, labels = list(prefix), [-100] * len(prefix)
        segment = [0] * len(prefix)
        start = positions[-1] + 1  # where every question starts, as in its own prompt
        for i, qa in enumerate(qas, start=1):
            prompt = self.tokenizer(PROMPT.format(question=qa.question))["input_ids"]
            assert prompt[:cut] == first[:cut], "the prompt prefix must not depend on the question"
            tail = prompt[cut:] + self.reply(qa)
            ids += tail
            labels += [-100] * (len(prompt) - cut) + tail[len(prompt) - cut :]
            segment += [i] * len(tail)
            positions += range(start, start + len(tail))
        return Packed(ids, labels, positions, segment)


@dataclass
class Packed:
    """A packed training row: token ids, labels (-100 = no loss), position ids and segment
    ids (0 = the shared image prefix, i = the i-th question)."""

    ids: list[int]
    labels: list[int]
    positions: list[int]
    segment: list[int]


def collate_packed(rows: list[Packed], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors and the block attention mask: causal, and a query sees a key when
    the key is in the prefix or in the query's own segment. Labels shifted by one."""
    length = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    segment = torch.full((len(rows), length), -1)
    targets = torch.full((len(rows), length), -100)
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids[b, :n] = torch.tensor(r.ids)
        positions[b, :n] = torch.tensor(r.positions)
        segment[b, :n] = torch.tensor(r.segment)
        targets[b, : n - 1] = torch.tensor(r.labels[1:])
        # A segment's last token must not predict the next segment's first token.
        last = [t for t in range(n - 1) if r.segment[t] != r.segment[t + 1]]
        targets[b, last] = -100
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    prefix = (segment == 0)[:, None, :]
    padding = torch.eye(length, dtype=torch.bool)[None] & (segment == -1)[:, :, None]
    mask = (causal[None] & (same | prefix) & (segment != -1)[:, None, :]) | padding
    return {
        "input_ids": ids,
        "attention_mask": mask[:, None],
        "position_ids": positions,
        "targets": targets,
    }


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch tensors; labels are shifted so position t predicts token t+1."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.full((len(rows), length), -100)
    for r, (row_ids, row_labels) in enumerate(rows):
        n = len(row_ids)
        ids[r, :n] = torch.tensor(row_ids)
        mask[r, :n] = 1
        targets[r, : n - 1] = torch.tensor(row_labels[1:])
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def answer_logits(model: LlavaForConditionalGeneration, batch: dict, pixels: torch.Tensor):
    """Logits at the supervised positions only ([M, vocab]) and their targets ([M])."""
    out = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        pixel_values=pixels,
    )
    where = batch["targets"] != -100
    return model.lm_head(out.last_hidden_state[where]), batch["targets"][where]


def kept_patches(per_cell: int, rng: random.Random) -> list[int] | None:
    """``per_cell`` random patches of each grid cell, in raster order (None: all 576).

    Why: with 576 vision tokens the language model needs thousands of steps before its
    attention finds the right cell (an 8-layer model sat near the answer priors for 500+
    steps here); with a few tokens per cell, each carrying its cell's content after the
    vision stage, the same circuits are learnt several times faster and each step is
    cheaper. The last phase of training then runs on all 576 tokens.
    """
    side = task.IMAGE_SIZE // fixtures._PATCH_SIZE
    if per_cell * task.GRID**2 >= side * side:
        return None
    size = side // task.GRID
    kept = []
    for row in range(task.GRID):
        for col in range(task.GRID):
            cell = [
                (row * size + r) * side + col * size + c for r in range(size) for c in range(size)
            ]
            kept += rng.sample(cell, per_cell)
    return sorted(kept)


def packed_answer_logits(
    model: LlavaForConditionalGeneration,
    batch: dict,
    features: torch.Tensor,
    kept: list[list[int] | None],
    image_token_id: int,
):
    """:func:`answer_logits` for packed rows, from the images' projected vision tokens
    ``features`` ([B, 576, hidden]); where ``kept`` names them, only those vision tokens
    of an image are in its row."""
    features = torch.cat(
        [f if index is None else f[index] for f, index in zip(features, kept, strict=True)]
    )
    embeds = model.model.get_input_embeddings()(batch["input_ids"])
    where = (batch["input_ids"] == image_token_id)[..., None]
    embeds = embeds.masked_scatter(where, features.to(embeds.dtype))
    out = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    )
    answer = batch["targets"] != -100
    return model.lm_head(out.last_hidden_state[answer]), batch["targets"][answer]


@torch.no_grad()
def heldout_accuracy(
    model: LlavaForConditionalGeneration, enc: Encoder, n: int, batch_size: int = 16
) -> dict[str, float]:
    """Single-turn held-out accuracy per type, teacher-forced: a sample counts as correct
    when every answer token and the final ``</s>`` are the argmax, i.e. exactly when greedy
    decoding would produce the answer."""
    model.eval()
    samples = task.held_out(n)
    hits: dict[str, list[bool]] = {t: [] for t in task.QUESTION_TYPES}
    for start in range(0, n, batch_size):
        chunk = samples[start : start + batch_size]
        rows = [enc.single_turn(qa) for _, qa in chunk]
        batch = collate(rows, enc.tokenizer.pad_token_id)
        logits, targets = answer_logits(
            model, batch, enc.pixel_values([s.render() for s, _ in chunk])
        )
        right = (logits.argmax(-1) == targets).tolist()
        lengths = [sum(x != -100 for x in labels) for _, labels in rows]
        for (_, qa), length in zip(chunk, lengths, strict=True):
            hits[qa.type].append(all(right[:length]))
            right = right[length:]
    model.train()
    acc = {t: sum(v) / len(v) for t, v in hits.items() if v}
    acc["all"] = sum(sum(v) for v in hits.values()) / n
    return acc


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model: LlavaForConditionalGeneration, processor, out: Path) -> Path:
    """llava-hf layout via the fixture builder (tokenizer, processor, chat template, renamed
    vision keys), float32 safetensors."""
    model.eval()
    return fixtures._save(model, processor, out)


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = fixtures.build_tokenizer()
    processor = build_processor(tokenizer)
    enc = Encoder(processor)
    config = build_config(tokenizer, args.init_std)
    config._attn_implementation = "sdpa"
    if args.init_from:  # continue training a saved checkpoint (no vision init)
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from).train()
        model.config._attn_implementation = "sdpa"
    else:
        model = LlavaForConditionalGeneration(config).train()
        informative_vision_init(model)
    begin = time.perf_counter()
    probe = VisionProbe(config.text_config.hidden_size)
    vision_stage = align_vision(model, probe, enc, args) if args.vision_steps else {}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    if args.probe_weight:
        no_decay += list(probe.parameters())
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    log: list[dict] = []
    start = time.perf_counter()
    seed = args.data_start  # data seeds from here up: the training split (not --seed)
    for step in range(args.steps):
        scenes, images, rows, kept = [], [], [], []
        per_cell = 64 if step >= args.steps - args.full_steps else args.tokens_per_cell
        for _ in range(args.batch_size):
            scene, qas = task.make_dialogue(seed, args.turns)
            kept.append(kept_patches(per_cell, random.Random(seed)))
            seed += 1
            scenes.append(scene)
            images.append(scene.render())
            rows.append(enc.packed(qas, kept[-1]))
        if step == 0:
            enc.check(images)
        batch = collate_packed(rows, tokenizer.pad_token_id)
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        features = image_features(model, enc.pixel_values(images))
        logits, targets = packed_answer_logits(model, batch, features, kept, enc.image_token_id)
        loss = answer_loss = torch.nn.functional.cross_entropy(logits, targets)
        if args.probe_weight:
            probe_loss, probe_hits = probe.loss(features, scenes, images)
            loss = loss + args.probe_weight * probe_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        entry = {"step": step + 1, "loss": answer_loss.item(), "lr": lr}
        if args.probe_weight:
            entry["probe_loss"], entry["probe"] = probe_loss.item(), probe_hits
        entry["seconds"] = time.perf_counter() - start
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            entry["heldout"] = heldout_accuracy(model, enc, args.eval_samples)
        if "heldout" in entry or (step + 1) % 10 == 0:
            extra = (
                f" probe {probe_loss.item():.3f} shape {probe_hits['shape']:.2f}"
                if args.probe_weight
                else ""
            )
            extra += f" heldout {entry['heldout']}" if "heldout" in entry else ""
            print(
                f"step {step + 1} loss {entry['loss']:.4f} lr {lr:.2e} "
                f"t {entry['seconds']:.0f}s{extra}",
                flush=True,
            )
        log.append(entry)
    assert seed <= task.HELD_OUT_SEED, "training seeds reached the held-out split"
    out = save_checkpoint(model, processor, Path(args.out))
    summary = {
        "args": vars(args),
        "parameters": n_params,
        "train_seconds": time.perf_counter() - begin,
        "final_heldout": log[-1]["heldout"],
        **vision_stage,
        "log": log,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"saved {out} in {summary['train_seconds']:.0f} s", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="checkpoints/vqa-tiny")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=4, help="dialogues (images) per step")
    parser.add_argument("--turns", type=int, default=24, help="questions per image")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--init-std", type=float, default=0.05, help="language model init")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--vision-steps", type=int, default=600, help="stage 1 (0: skip)")
    parser.add_argument("--init-from", help="a checkpoint to continue from (skips the init)")
    parser.add_argument("--data-start", type=int, default=0, help="first training data seed")
    parser.add_argument("--tokens-per-cell", type=int, default=4, help="vision tokens kept")
    parser.add_argument("--full-steps", type=int, default=300, help="last steps: all 576")
    parser.add_argument("--vision-batch-size", type=int, default=16)
    parser.add_argument("--vision-lr", type=float, default=2e-3)
    parser.add_argument(
        "--probe-weight", type=float, default=0.0, help="stage 2: keep the vision probe loss"
    )
    train(parser.parse_args())


if __name__ == "__main__":
    main()
