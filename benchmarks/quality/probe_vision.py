"""What the vision tokens still carry: linear probes on a checkpoint's frozen projected
vision tokens (what its language model reads), per patch at least half covered by a shape.

    python benchmarks/quality/probe_vision.py [--model checkpoints/vqa-tiny | init]

Why: the shipped shapes-VQA model plateaus below the accuracy wanted; most of its errors
are "no" existence questions answered "yes", colour answers naming another colour and
position answers naming the wrong row or column.
This asks whether the tower's tokens still name their grid cell, the shape's colour, its
kind and the colour-kind pair, as the trainer's vision stage taught them. ``--model init``
probes the untrained model right after ``informative_vision_init`` (the reference: cell
and colour are built into its embeddings). A probe fits on scenes from the training
range and is scored on held-out scenes.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlavaForConditionalGeneration

from vtw_vllm.quality import task, train
from vtw_vllm.testing import fixtures

CELL_OF_TOKEN = train.grid_cell_of_tokens()


@torch.no_grad()
def covered_features(
    model: LlavaForConditionalGeneration, enc: train.Encoder, seeds: range
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Projected vision tokens of the covered patches, [M, hidden], and their labels."""
    scenes = [task.sample_scene(seed)[0] for seed in seeds]
    images = [scene.render() for scene in scenes]
    features = train.image_features(model, enc.pixel_values(images))
    covered = train.object_patches(images)
    colour, shape = (labels[:, CELL_OF_TOKEN] for labels in train.scene_labels(scenes))
    labels = {
        "cell": CELL_OF_TOKEN.expand_as(colour),
        "colour": colour,
        "shape": shape,
        "colour+shape": colour * (1 + len(task.SHAPES)) + shape,
    }
    return features[covered], {name: value[covered] for name, value in labels.items()}


def probe_accuracy(
    x_fit: torch.Tensor, y_fit: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
) -> float:
    """Held-out accuracy of a linear softmax probe fitted with Adam (full batch)."""
    torch.manual_seed(0)
    classes = int(max(y_fit.max(), y_test.max())) + 1
    probe = torch.nn.Linear(x_fit.shape[1], classes)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(probe(x_fit), y_fit)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (probe(x_test).argmax(-1) == y_test).float().mean().item()


def probe_vision(
    model: LlavaForConditionalGeneration, enc: train.Encoder, fit_images: int, test_images: int
) -> dict[str, tuple[float, float]]:
    """Per label: (held-out linear probe accuracy, most frequent label's share)."""
    fit_start = task.HELD_OUT_SEED - fit_images  # the training range's last seeds
    x_fit, y_fit = covered_features(model, enc, range(fit_start, task.HELD_OUT_SEED))
    held_out = range(task.HELD_OUT_SEED, task.HELD_OUT_SEED + test_images)
    x_test, y_test = covered_features(model, enc, held_out)
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_test = (x_fit - mean) / std, (x_test - mean) / std
    return {
        name: (
            probe_accuracy(x_fit, y_fit[name], x_test, y_test[name]),
            (y_test[name] == y_test[name].mode().values).float().mean().item(),
        )
        for name in y_fit
    }


def load(name: str, tokenizer) -> LlavaForConditionalGeneration:
    """A checkpoint folder, or ``init``: the untrained model after the vision init."""
    if name != "init":
        return LlavaForConditionalGeneration.from_pretrained(name).eval()
    model = LlavaForConditionalGeneration(train.build_config(tokenizer))
    train.informative_vision_init(model)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="checkpoints/vqa-tiny", help="a checkpoint or init")
    parser.add_argument("--fit-images", type=int, default=192)
    parser.add_argument("--test-images", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)  # the init model's weights
    tokenizer = fixtures.build_tokenizer()
    enc = train.Encoder(train.build_processor(tokenizer))
    table = probe_vision(load(args.model, tokenizer), enc, args.fit_images, args.test_images)
    print(f"| {args.model} | " + " | ".join(table) + " |")
    print("|---" * (1 + len(table)) + "|")
    for i, name in enumerate(("linear probe (held-out)", "most frequent label")):
        print(f"| {name} | " + " | ".join(f"{100 * v[i]:.1f}" for v in table.values()) + " |")


if __name__ == "__main__":
    main()
