"""Choose the withdrawal layer K by KL divergence, as the VTW paper does (its Eq. 6).

For a few samples, compare the standard model's next-token distribution with VTW's for
every candidate K and take the first (smallest) K whose mean KL(P_standard || P_vtw) is
below ``eta`` (the paper: 20 samples, eta = 0.003). It runs on the vLLM engine itself, so
the numerics are those that will serve: one VTW engine with per-request K evaluates every
candidate, K = N being the standard model. Distributions are the full vocabulary
(``logprobs=-1``); with ``num_tokens = m > 1`` the KL is averaged over the first m answer
tokens, teacher-forced on the standard answer.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vtw_vllm.config import DEFAULT_LAYER_GROUP_SIZE, EXTRA_ARGS_KEY, VTWConfig

VTW_ARCHITECTURES = {
    "LlavaForConditionalGeneration": "LlavaVTWForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "LlavaNextVTWForConditionalGeneration",
    "LlavaVTWForConditionalGeneration": "LlavaVTWForConditionalGeneration",
    "LlavaNextVTWForConditionalGeneration": "LlavaNextVTWForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "LlavaOnevisionVTWForConditionalGeneration",
    "LlavaNextVideoForConditionalGeneration": "LlavaNextVideoVTWForConditionalGeneration",
    "LlavaOnevisionVTWForConditionalGeneration": "LlavaOnevisionVTWForConditionalGeneration",
    "LlavaNextVideoVTWForConditionalGeneration": "LlavaNextVideoVTWForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLVTWForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "Qwen3VLVTWForConditionalGeneration",
    "Qwen2_5_VLVTWForConditionalGeneration": "Qwen2_5_VLVTWForConditionalGeneration",
    "Qwen3VLVTWForConditionalGeneration": "Qwen3VLVTWForConditionalGeneration",
}
# Architectures refused with a reason (not a bare "unsupported").
REFUSED_ARCHITECTURES = {
    "Qwen3VLMoeForConditionalGeneration": "Qwen3-VL MoE is not supported yet (dense Qwen3-VL is)",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
# Frames sampled (uniformly) from a video file: what `vllm serve` samples by default
# (vLLM's VideoMediaIO), so a calibration sees the frames a deployment will.
VIDEO_NUM_FRAMES = 32
MEDIA = ("image", "video")


class CalibrationError(ValueError):
    """Bad calibration input (data file, image, model), raised before any engine starts."""


@dataclass
class CalibrationSample:
    """One image or one video and its prompt: a full model prompt containing ``<image>``
    (``<video>``), or a plain question that is wrapped with the model's chat template."""

    image: Image.Image | None
    prompt: str
    video: np.ndarray | None = None  # [frames, height, width, 3] uint8 RGB
    video_metadata: dict[str, Any] | None = None  # fps, frame indices (Qwen-VL needs them)

    @property
    def modality(self) -> str:
        return "video" if self.video is not None else "image"

    @property
    def multi_modal_data(self) -> dict[str, Any]:
        return media_data(self.image, self.video, self.video_metadata)


def media_data(
    image: Image.Image | None, video: np.ndarray | None, metadata: dict[str, Any] | None
) -> dict[str, Any]:
    """vLLM's ``multi_modal_data`` of one image or one video (with its metadata: the
    frames' timestamps, which Qwen-VL's temporal positions are computed from)."""
    if video is None:
        return {"image": image}
    return {"video": (video, metadata) if metadata is not None else video}


@dataclass
class CalibrationResult:
    """KL per candidate K per sample, and the K the criterion picks."""

    num_layers: int
    eta: float
    num_tokens: int
    kl: dict[int, list[float]] = field(default_factory=dict)

    def mean_kl(self, k: int) -> float:
        return float(np.mean(self.kl[k]))

    def max_kl(self, k: int) -> float:
        return float(np.max(self.kl[k]))

    @property
    def chosen_k(self) -> int | None:
        """The first (smallest) candidate whose mean KL is below eta; None if none is."""
        return next((k for k in sorted(self.kl) if self.mean_kl(k) < self.eta), None)

    def to_markdown(self) -> str:
        lines = [
            f"| K | mean KL | max KL | < eta ({self.eta:g}) |",
            "|---|---|---|---|",
        ]
        for k in sorted(self.kl):
            mark = "yes" if self.mean_kl(k) < self.eta else "no"
            chosen = " **(chosen)**" if k == self.chosen_k else ""
            none = " (no withdrawal)" if k == self.num_layers else ""
            lines.append(
                f"| {k}{none}{chosen} | {self.mean_kl(k):.3g} | {self.max_kl(k):.3g} | {mark} |"
            )
        lines.append(
            f"\nchosen K = {self.chosen_k} of {self.num_layers} layers "
            f"({len(next(iter(self.kl.values())))} samples, KL over the first "
            f"{self.num_tokens} answer token(s))"
        )
        return "\n".join(lines)


def _open_image(ref: str, base: Path, where: str) -> Image.Image:
    if ref.startswith("data:"):
        try:
            payload = ref.split(",", 1)[1]
            return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")
        except Exception as exc:  # any decoding failure is the user's data
            raise CalibrationError(f"{where}: cannot decode the image data URL ({exc})") from exc
    path = Path(ref) if Path(ref).is_absolute() else base / ref
    if not path.is_file():
        raise CalibrationError(f"{where}: image not found: {path}")
    try:
        return Image.open(path).convert("RGB")
    except Exception as exc:
        raise CalibrationError(f"{where}: cannot read image {path} ({exc})") from exc


def _media_bytes(ref: str, base: Path, where: str, what: str) -> bytes:
    """The bytes of a data URL, an absolute path or a path relative to ``base``."""
    if ref.startswith("data:"):
        try:
            return base64.b64decode(ref.split(",", 1)[1], validate=True)
        except Exception as exc:
            raise CalibrationError(f"{where}: cannot decode the {what} data URL ({exc})") from exc
    path = Path(ref) if Path(ref).is_absolute() else base / ref
    if not path.is_file():
        raise CalibrationError(f"{where}: {what} not found: {path}")
    return path.read_bytes()


def open_video(
    ref: str, base: Path, where: str, num_frames: int = VIDEO_NUM_FRAMES
) -> tuple[np.ndarray, dict[str, Any]]:
    """A video file (path or data URL, any container OpenCV reads: mp4, webm, mkv, ...)
    decoded by vLLM's own video loader, ``num_frames`` sampled uniformly as `vllm serve`
    does: ``[frames, height, width, 3]`` uint8 RGB, and vLLM's metadata of the frames."""
    data = _media_bytes(ref, base, where, "video")
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO

    try:
        frames, metadata = (
            VideoMediaIO(ImageMediaIO(), num_frames=num_frames).load_bytes(data).media
        )
    except Exception as exc:  # any decoding failure is the user's data
        raise CalibrationError(f"{where}: cannot decode the video ({exc})") from exc
    frames = np.asarray(frames)
    if frames.ndim != 4 or not len(frames):
        raise CalibrationError(f"{where}: the video has no frames")
    return frames, dict(metadata)


def row_media(
    row: dict[str, Any], base: Path, where: str, num_frames: int = VIDEO_NUM_FRAMES
) -> tuple[Image.Image | None, np.ndarray | None, dict[str, Any] | None]:
    """(image, video, video metadata) of a row from :func:`media_rows`: exactly one of
    the image and the video is not None."""
    if "video" in row:
        return None, *open_video(row["video"], base, where, num_frames)
    return _open_image(row["image"], base, where), None, None


def media_rows(path: Path, expected: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", row) for every non-empty line of a JSONL file whose rows are objects
    with an ``"image"`` or a ``"video"`` string (not both); CalibrationError naming the
    line otherwise."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{where}: not valid JSON ({exc.msg})") from exc
        media = [m for m in MEDIA if m in row] if isinstance(row, dict) else []
        if len(media) != 1 or not isinstance(row[media[0]], str):
            raise CalibrationError(f"{where}: expected {expected}")
        yield where, row


def _from_jsonl(
    path: Path, limit: int | None, num_frames: int = VIDEO_NUM_FRAMES
) -> list[CalibrationSample]:
    samples = []
    for where, row in media_rows(path, '{"image" or "video": path or data URL, "prompt": ...}'):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise CalibrationError(f'{where}: "prompt" must be a non-empty string')
        image, video, metadata = row_media(row, path.parent, where, num_frames)
        samples.append(CalibrationSample(image, row["prompt"], video, metadata))
        if limit is not None and len(samples) == limit:
            break
    return samples


def _from_folder(
    folder: Path, limit: int | None, num_frames: int = VIDEO_NUM_FRAMES
) -> list[CalibrationSample]:
    """A folder of images plus ``prompts.jsonl`` (as a data file) or ``prompts.txt``: one
    prompt for every image, or lines ``image_file<TAB>prompt``."""
    if (folder / "prompts.jsonl").is_file():
        return _from_jsonl(folder / "prompts.jsonl", limit, num_frames)
    prompts = folder / "prompts.txt"
    if not prompts.is_file():
        raise CalibrationError(f"{folder}: a data folder needs prompts.jsonl or prompts.txt")
    lines = [line for line in prompts.read_text().splitlines() if line.strip()]
    if len(lines) == 1 and "\t" not in lines[0]:
        images = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        pairs = [(name, lines[0]) for name in images]
    else:
        pairs = []
        for number, line in enumerate(lines, start=1):
            if "\t" not in line:
                raise CalibrationError(f"{prompts}:{number}: expected 'image_file<TAB>prompt'")
            pairs.append(tuple(line.split("\t", 1)))
    pairs = pairs[:limit] if limit is not None else pairs
    return [
        CalibrationSample(_open_image(name, folder, f"{prompts}"), prompt) for name, prompt in pairs
    ]


def load_samples(
    path: str | Path, limit: int | None = None, num_frames: int = VIDEO_NUM_FRAMES
) -> list[CalibrationSample]:
    """Read calibration samples: a JSONL file of ``{"image", "prompt"}`` or ``{"video",
    "prompt"}`` rows (a path relative to the file, an absolute path or a data URL; a
    video is decoded as :func:`open_video` does, ``num_frames`` frames at most) or a
    folder of images (see :func:`_from_folder`). Raises :class:`CalibrationError` on bad
    data."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"data not found: {path}")
    if path.is_dir():
        samples = _from_folder(path, limit, num_frames)
    else:
        samples = _from_jsonl(path, limit, num_frames)
    if not samples:
        raise CalibrationError(f"{path}: no samples")
    return samples


def vtw_architecture(model: str | Path) -> str:
    """The VTW architecture serving ``model``; CalibrationError if VTW does not serve it."""
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        raise CalibrationError(f"{model}: no config.json (a local llava-hf checkpoint is needed)")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    for name in architectures:
        if name in VTW_ARCHITECTURES:
            return VTW_ARCHITECTURES[name]
        if name in REFUSED_ARCHITECTURES:
            raise CalibrationError(f"{model}: {REFUSED_ARCHITECTURES[name]}")
    raise CalibrationError(
        f"{model}: architectures {architectures} is not a model VTW serves "
        f"(supported: {sorted(set(VTW_ARCHITECTURES) - set(VTW_ARCHITECTURES.values()))})"
    )


CPU_MAX_MODEL_LEN = 4096  # LLaVA-1.5's context; a LLaVA-NeXT anyres prompt fits too
CPU_KV_SEQUENCES = 4  # full-length sequences the default KV cache holds at once
CPU_KV_FLOOR = 64 * 2**20
_DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "float16": 2, "half": 2, "bfloat16": 2}


def _kv_bytes_per_element(engine_kwargs: dict[str, Any]) -> int:
    """Bytes per KV element: ``kv_cache_dtype`` (fp8: 1), else ``dtype``, else what vLLM's
    "auto" picks on this platform (its first supported dtype: bf16 on most CPUs)."""
    import torch
    from vllm.platforms import current_platform

    kv_dtype = str(engine_kwargs.get("kv_cache_dtype", "auto"))
    if kv_dtype.startswith("fp8"):
        return 1
    dtype = engine_kwargs.get("dtype", "auto")
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    return current_platform.supported_dtypes[0].itemsize


def job_engine_args(model: str | Path, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``engine_kwargs`` with a KV cache and context sized for a calibration or evaluation
    job on the CPU platform; unchanged on a GPU (vLLM's defaults fit there).

    vLLM's CPU default reserves ``gpu_memory_utilization`` (0.92) of the node's memory
    and refuses to start when less is free, which a shared machine rarely has. A few
    requests of ``max_model_len`` tokens is all these jobs need: ``max_model_len``
    defaults to min(4096, the model's), the KV cache to CPU_KV_SEQUENCES such sequences
    (2 x layers x KV heads x head dim x dtype bytes per token), at least 64 MiB. What the
    caller sets (or ``VLLM_CPU_KVCACHE_SPACE``) wins.
    """
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return dict(engine_kwargs)
    text = AutoConfig.from_pretrained(str(model)).get_text_config()
    args = dict(engine_kwargs)
    model_len = getattr(text, "max_position_embeddings", None) or CPU_MAX_MODEL_LEN
    args.setdefault("max_model_len", min(CPU_MAX_MODEL_LEN, model_len))
    user_sized = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(args)
    if not user_sized and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        per_token = 2 * text.num_hidden_layers * heads * head_dim
        per_token *= _kv_bytes_per_element(args)
        args["kv_cache_memory_bytes"] = max(
            CPU_KV_FLOOR, per_token * CPU_KV_SEQUENCES * args["max_model_len"]
        )
    return args


def make_engine(model: str | Path, layer_group_size: int | None = None, **engine_kwargs: Any):
    """A VTW engine fit for calibration and evaluation: full-vocabulary logprobs,
    candidates allowed by ``layer_group_size`` (default: the model config's, else 4; given,
    it replaces a prepared model's ``vtw_allowed_k``), sized by :func:`job_engine_args`."""
    from vllm import LLM

    overrides: dict[str, Any] = {"architectures": [vtw_architecture(model)]}
    if layer_group_size is not None:
        overrides.update(vtw_layer_group_size=layer_group_size, vtw_allowed_k=None)
    engine_kwargs.setdefault("max_logprobs", -1)
    engine_kwargs = job_engine_args(model, engine_kwargs)
    return LLM(model=str(model), hf_overrides=overrides, **engine_kwargs)


@contextlib.contextmanager
def job_engine(model: str | Path, layer_group_size: int | None = None, **engine_kwargs: Any):
    """:func:`make_engine`, shut down when the job ends (its processes and memory freed, also
    when the job runs inside a longer-lived process)."""
    llm = make_engine(model, layer_group_size, **engine_kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def _prompt_ids(llm, sample: CalibrationSample) -> list[int]:
    """Token ids of the sample's prompt with one image or video placeholder (``<image>``,
    or Qwen-VL's ``<|image_pad|>``; vLLM expands it)."""
    tokenizer = llm.get_tokenizer()
    text = sample.prompt
    placeholders = (f"<{sample.modality}>", f"<|{sample.modality}_pad|>")  # LLaVA, Qwen-VL
    if not any(p in text for p in placeholders):
        content = [{"type": sample.modality}, {"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text)["input_ids"]


def _dense(logprobs: dict, vocab_size: int) -> np.ndarray:
    out = np.full(vocab_size, -np.inf)
    for token_id, lp in logprobs.items():
        if token_id < vocab_size:
            out[token_id] = lp.logprob
    return out


def _kl(standard: np.ndarray, other: np.ndarray) -> float:
    """KL(P_standard || P_other) in float64 from log-probabilities."""
    p = np.exp(standard)
    mask = p > 0
    return float(np.sum(p[mask] * (standard[mask] - other[mask])))


def calibrate(
    model: str | Path,
    samples: list[CalibrationSample],
    eta: float = 0.003,
    candidates: list[int] | None = None,
    num_tokens: int = 1,
    llm=None,
    progress: bool = True,
    layer_group_size: int | None = None,
    **engine_kwargs: Any,
) -> CalibrationResult:
    """KL per candidate K (default: every K the model's KV layout allows) and the chosen K.

    ``llm``: reuse a VTW engine built by :func:`make_engine` (or equivalent).
    """
    from vllm import SamplingParams, TokensPrompt

    if not samples:
        raise CalibrationError("no samples")
    if num_tokens < 1:
        raise CalibrationError(f"num_tokens must be >= 1, got {num_tokens}")
    vtw_architecture(model)
    if llm is None:
        with job_engine(model, layer_group_size, **engine_kwargs) as own:
            return calibrate(model, samples, eta, candidates, num_tokens, own, progress)
    hf_config = llm.llm_engine.vllm_config.model_config.hf_config
    vtw = VTWConfig.from_hf_config(hf_config)
    vocab_size = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    candidates = sorted(set(candidates)) if candidates else vtw.allowed_k
    bad = [k for k in candidates if k not in vtw.allowed_k]
    if bad:
        raise CalibrationError(
            f"candidates {bad} are not allowed; this engine allows {vtw.allowed_k} "
            f"(KV layer groups start at {vtw.group_starts}; use a smaller "
            f"vtw_layer_group_size or name them in vtw_allowed_k)"
        )

    def params(k: int, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=0.0, max_tokens=max_tokens, logprobs=-1, extra_args={EXTRA_ARGS_KEY: k}
        )

    def prompt(ids: list[int], sample: CalibrationSample) -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=ids, multi_modal_data=sample.multi_modal_data)

    bases = [_prompt_ids(llm, s) for s in samples]
    # The standard answer and its distributions: K = N, greedy.
    standard = llm.generate(
        [prompt(ids, s) for ids, s in zip(bases, samples, strict=True)],
        params(vtw.num_layers, num_tokens),
        use_tqdm=progress_bar("calibration, standard answers (K = N)") if progress else False,
    )
    answers, reference = [], []
    for out in standard:
        completion = out.outputs[0]
        answers.append(list(completion.token_ids))
        reference.append([_dense(step, vocab_size) for step in completion.logprobs])

    # Every candidate on every sample, teacher-forced on the standard answer's tokens.
    jobs, prompts, sampling = [], [], []
    for k in candidates:
        for i, (ids, sample) in enumerate(zip(bases, samples, strict=True)):
            for t in range(len(answers[i])):
                jobs.append((k, i, t))
                prompts.append(prompt(ids + answers[i][:t], sample))
                sampling.append(params(k, 1))
    desc = "calibration, samples x candidate K"
    outputs = llm.generate(prompts, sampling, use_tqdm=progress_bar(desc) if progress else False)
    per_token: dict[tuple[int, int], list[float]] = {}
    for (k, i, t), out in zip(jobs, outputs, strict=True):
        dist = _dense(out.outputs[0].logprobs[0], vocab_size)
        per_token.setdefault((k, i), []).append(_kl(reference[i][t], dist))
    result = CalibrationResult(num_layers=vtw.num_layers, eta=eta, num_tokens=num_tokens)
    for k in candidates:
        result.kl[k] = [float(np.mean(per_token[(k, i)])) for i in range(len(samples))]
    return result


def progress_bar(label: str) -> Callable[..., Any]:
    """A ``use_tqdm`` callable for ``LLM.generate``: vLLM's bars (rendering, processing)
    prefixed with which pass of the job they belong to."""
    from tqdm.auto import tqdm

    def bar(*args: Any, **kwargs: Any):
        return tqdm(*args, **{**kwargs, "desc": f"{label}: {kwargs.get('desc', '')}"})

    return bar


def plot_kl(result: CalibrationResult, path: str | Path, title: str = "") -> Path:
    """KL vs K on a log scale with the eta line, like the paper's Fig. 8(b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-12  # KL = 0 (K = N) cannot sit on a log axis
    ks = sorted(result.kl)
    means = [max(result.mean_kl(k), floor) for k in ks]
    lows = [max(min(result.kl[k]), floor) for k in ks]
    highs = [max(result.max_kl(k), floor) for k in ks]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.fill_between(ks, lows, highs, alpha=0.2, label="min-max over samples")
    ax.plot(ks, means, marker="o", label="mean KL")
    ax.axhline(result.eta, color="red", linestyle="--", label=f"eta = {result.eta:g}")
    if result.chosen_k is not None:
        ax.axvline(result.chosen_k, color="green", linestyle=":", label=f"K = {result.chosen_k}")
    ax.set_yscale("log")
    ax.set_xlabel("withdrawal layer K")
    ax.set_ylabel(f"KL(standard || VTW), floor {floor:g}")
    ax.set_title(title or f"KL vs K ({len(result.kl[ks[0]])} samples)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_vtw_k(model: str | Path, k: int, layer_group_size: int | None = None) -> Path:
    """Record the chosen K (and a non-default group size) in the model's config.json."""
    config_path = Path(model) / "config.json"
    config = json.loads(config_path.read_text())
    config["vtw_k"] = k
    if layer_group_size is not None and layer_group_size != DEFAULT_LAYER_GROUP_SIZE:
        config["vtw_layer_group_size"] = layer_group_size
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return config_path


def summary_line(result: CalibrationResult) -> str:
    k = result.chosen_k
    if k is None:
        return f"no candidate K reaches KL < {result.eta:g}: keep K = N = {result.num_layers}"
    saved = 1 - k / result.num_layers
    return (
        f"chosen K = {k} of {result.num_layers} layers: vision tokens withdrawn from "
        f"{math.floor(saved * 100)}% of the layers (KL {result.mean_kl(k):.3g} < {result.eta:g})"
    )
