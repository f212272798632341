"""Accuracy of a LLaVA model served by vLLM, stock or with VTW at any K, on a VQA file.

    vtw-vllm evaluate --model DIR --data FILE.jsonl [--k 16 20 32] [--table out.md]

The file is POPE/MME-style JSONL, one question per line::

    {"image": "val2014/COCO_1.jpg", "question": "Is there a dog?", "answer": "yes",
     "type": "adversarial"}

``question`` may be called ``text`` and ``answer`` ``label`` (POPE's names), ``type``
``category`` (MME's); images are paths relative to the file, absolute paths or data URLs.
A row may carry a ``"video"`` (a video file or data URL, decoded by vLLM's video loader
as :func:`vtw_vllm.calibrate.open_video` does) instead of its ``"image"``: video-QA for
LLaVA-NeXT-Video / LLaVA-OneVision.
A prediction is right when it equals the answer after :func:`normalise` (lower case, no
punctuation, number words as digits), or, with ``--first-word``, when its first word does
(yes/no benchmarks whose models add an explanation).

One VTW engine evaluates every K through per-request K (``extra_args``), K = N being the
standard model; the benchmark compares that with stock vLLM too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vtw_vllm.calibrate import (
    VIDEO_NUM_FRAMES,
    CalibrationError,
    media_data,
    media_rows,
    progress_bar,
    row_media,
)
from vtw_vllm.config import EXTRA_ARGS_KEY
from vtw_vllm.prompts import engine_prompt
from vtw_vllm.quality.task import normalise

ALIASES = {"question": ("question", "text"), "answer": ("answer", "label")}


class EvaluationError(CalibrationError):
    """Bad evaluation input, raised before any engine starts."""


@dataclass(frozen=True)
class EvalItem:
    image: Image.Image | None  # None (and no video): ask without the image (an ablation)
    question: str
    answer: str
    type: str = "all"
    video: np.ndarray | None = None  # [frames, height, width, 3] uint8, instead of an image
    video_metadata: dict[str, Any] | None = None  # vLLM's, as decoded (Qwen-VL needs it)


def _field(row: dict[str, Any], name: str, where: str) -> str:
    for key in ALIASES[name]:
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key]
    names = " or ".join(repr(key) for key in ALIASES[name])
    raise EvaluationError(f"{where}: needs a non-empty string {names}")


def load_eval_file(
    path: str | Path, limit: int | None = None, num_frames: int = VIDEO_NUM_FRAMES
) -> list[EvalItem]:
    """Read a POPE/MME-style JSONL file (see the module docstring); a video keeps
    ``num_frames`` frames at most."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"data file not found: {path}")
    items: list[EvalItem] = []
    try:
        for where, row in media_rows(path, '{"image" or "video", "question", "answer"}'):
            image, video, metadata = row_media(row, path.parent, where, num_frames)
            items.append(
                EvalItem(
                    image=image,
                    question=_field(row, "question", where),
                    answer=_field(row, "answer", where),
                    type=str(row.get("type", row.get("category", "all"))),
                    video=video,
                    video_metadata=metadata,
                )
            )
            if limit is not None and len(items) == limit:
                break
    except EvaluationError:
        raise
    except CalibrationError as exc:  # the shared JSONL and image readers' errors
        raise EvaluationError(str(exc)) from exc
    if not items:
        raise EvaluationError(f"{path}: no questions")
    return items


def is_correct(prediction: str, answer: str, first_word: bool = False) -> bool:
    predicted, expected = normalise(prediction), normalise(answer)
    if first_word:
        return predicted.split()[:1] == expected.split()[:1]
    return predicted == expected


@dataclass(frozen=True)
class Accuracy:
    """Accuracy per question type and overall, with the raw predictions."""

    per_type: dict[str, float]
    overall: float
    predictions: list[str]


def score(items: Sequence[EvalItem], predictions: Sequence[str], first_word=False) -> Accuracy:
    hits: dict[str, list[bool]] = {}
    for item, prediction in zip(items, predictions, strict=True):
        hits.setdefault(item.type, []).append(is_correct(prediction, item.answer, first_word))
    total = [h for v in hits.values() for h in v]
    return Accuracy(
        per_type={t: sum(v) / len(v) for t, v in sorted(hits.items())},
        overall=sum(total) / len(total),
        predictions=list(predictions),
    )


def generate_answers(
    llm,
    items: Sequence[EvalItem],
    k: int | None = None,
    max_tokens: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy answers from a vLLM ``LLM`` (``k``: per-request VTW K; None: the engine's
    default). On LLaVA models items are asked in LLaVA-1.5's format (with a video in
    LLaVA-NeXT-Video's; without an image or a video as text-only prompts), on the others
    (Qwen-VL) in the model's chat template. ``progress``: a
    progress bar labelled with K (a long file takes minutes per K on a CPU)."""
    from vllm import SamplingParams

    extra = {EXTRA_ARGS_KEY: k} if k is not None else None
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra)
    prompts: list[Any] = []
    for item in items:
        modality = "video" if item.video is not None else "image" if item.image else None
        prompt = engine_prompt(llm, modality, item.question)
        if modality is None:
            prompts.append(prompt)
        else:
            data = media_data(item.image, item.video, item.video_metadata)
            prompts.append({"prompt": prompt, "multi_modal_data": data})
    bar = progress_bar(f"evaluate, K = {k if k is not None else 'default'}") if progress else False
    outputs = llm.generate(prompts, params, use_tqdm=bar)
    return [out.outputs[0].text for out in outputs]


def evaluate(
    llm,
    items: Sequence[EvalItem],
    ks: Sequence[int | None],
    first_word: bool = False,
    progress: bool = False,
) -> dict[int | None, Accuracy]:
    """Accuracy for every K in ``ks`` on one engine."""
    return {
        k: score(items, generate_answers(llm, items, k, progress=progress), first_word) for k in ks
    }


def to_markdown(results: dict[Any, Accuracy], label: str = "K") -> str:
    types = sorted({t for acc in results.values() for t in acc.per_type})
    lines = [
        f"| {label} | " + " | ".join(types) + " | all |",
        "|---|" + "---|" * (len(types) + 1),
    ]
    for name, acc in results.items():
        cells = [f"{100 * acc.per_type[t]:.1f}" if t in acc.per_type else "-" for t in types]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * acc.overall:.1f} |")
    return "\n".join(lines)
