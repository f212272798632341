"""Write a VTW model directory from a llava-hf checkpoint, so that ``vllm serve DIR`` and
``LLM(model=DIR)`` serve it with VTW and no ``--hf-overrides``.

DIR holds the source's ``config.json`` with the VTW architecture, ``vtw_k`` and
``vtw_allowed_k``; every other file of the source is a symlink (the weights are not
copied). Everything is checked before anything is written; errors are
:class:`PrepareError` with one line saying what is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from vtw_vllm.calibrate import CalibrationError, vtw_architecture

CONFIG = "config.json"


class PrepareError(CalibrationError):
    """Bad ``prepare`` input, raised before anything is written."""


def num_layers(model: str | Path) -> int:
    """Decoder layers N of a LLaVA checkpoint: ``text_config.num_hidden_layers``, else
    through transformers (llava-hf configs often omit it, leaving the text model's
    default), which is slower to import."""
    text = json.loads((Path(model) / CONFIG).read_text()).get("text_config") or {}
    if isinstance(text.get("num_hidden_layers"), int):
        return text["num_hidden_layers"]
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(model)).get_text_config().num_hidden_layers)


def check_out(out: str | Path, src: str | Path, force: bool = False) -> None:
    """Refuse an output directory whose contents would be lost: an existing non-empty
    directory, unless ``force`` and it holds only what :func:`prepare` writes (a
    ``config.json`` and symlinks), and never the source itself."""
    out, src = Path(out), Path(src)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a directory")
    if out.resolve() == src.resolve():
        raise PrepareError(f"--out {out}: is the source model directory")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not force:
        raise PrepareError(f"--out {out}: exists and is not empty (--force replaces it)")
    foreign = [p.name for p in entries if not p.is_symlink() and p.name != CONFIG]
    if foreign:
        raise PrepareError(
            f"--out {out}: holds files that prepare did not write ({', '.join(foreign[:3])}); "
            "--force only replaces a prepared directory"
        )


def prepare(
    src: str | Path,
    out: str | Path,
    k: int,
    allowed_k: Sequence[int] | None = None,
    force: bool = False,
) -> Path:
    """Write the VTW directory ``out`` for ``src`` with default K ``k``; returns it.

    ``allowed_k``: the K values requests may use (default ``[k]``; N is always allowed).
    Each is a KV cache layer-group boundary, and every group costs per-step work, so
    ``[k]`` (two groups: layers below K and from K on) is the cheapest layout.
    """
    src, out = Path(src), Path(out)
    try:
        architecture = vtw_architecture(src)
    except CalibrationError as exc:
        raise PrepareError(str(exc)) from exc
    n = num_layers(src)
    if not 1 <= k <= n:
        raise PrepareError(f"--vtw-k {k}: must be in 1..{n} ({src} has {n} decoder layers)")
    allowed = sorted(set(allowed_k)) if allowed_k else [k]
    bad = [a for a in allowed if not 1 <= a <= n]
    if bad:
        raise PrepareError(f"--allowed-k {bad}: must be in 1..{n}")
    if k not in allowed:
        raise PrepareError(f"--allowed-k {allowed}: must contain --vtw-k {k}")
    check_out(out, src, force)

    config = json.loads((src / CONFIG).read_text())
    config.update(architectures=[architecture], vtw_k=k, vtw_allowed_k=allowed)
    out.mkdir(parents=True, exist_ok=True)
    for entry in out.iterdir():  # only a prepared directory's entries (check_out)
        entry.unlink()
    for entry in sorted(src.iterdir()):
        if entry.name != CONFIG:
            os.symlink(entry.absolute(), out / entry.name)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def describe(out: str | Path) -> str:
    """One line on what a prepared directory serves."""
    from vtw_vllm.config import VTWConfig

    config = json.loads((Path(out) / CONFIG).read_text())
    vtw = VTWConfig(
        num_layers=num_layers(out),
        default_k=config["vtw_k"],
        allowed_k_values=tuple(config["vtw_allowed_k"]),
    )
    groups = len(vtw.group_starts)
    return (
        f"wrote {out}: {config['architectures'][0]}, vtw_k={vtw.default_k}, "
        f"allowed K {vtw.allowed_k} ({groups} KV cache group{'s' if groups > 1 else ''}); "
        f"serve it with: vllm serve {out}"
    )
