"""Part ``groups`` of the serving benchmark (``run.py --parts groups``).

What each KV cache group costs per decode step: VTW at K = N (nothing withdrawn) with 1
group (``vtw_allowed_k`` [N]), 2 groups ([N/2, N]) and N/2 groups
(``vtw_layer_group_size`` 2), vs stock; ms per step and the per-group slope. Its engines
(``vtw_1group``, ``vtw_group_size2``, and stock and VTW of part ``defaults``: see
``common.engine_spec``) run at vLLM's defaults, interleaved with those of ``defaults``.
"""

from __future__ import annotations

import statistics
from typing import Any

from common import fmt, over


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def section(res: dict[str, Any]) -> list[str]:
    """The report's section: decode ms/step and prefill per engine, and the slope."""
    stock = res["stock"]["per_k"]["None"]
    n = res["vtw"]["num_layers"]
    rows = [("stock", res["stock"]["engine"]["kv_cache_groups"], stock)]
    for name in ("vtw_1group", "vtw", "vtw_group_size2"):
        rows.append(
            (f"VTW {name}", res[name]["engine"]["kv_cache_groups"], res[name]["per_k"][str(n)])
        )
    lines = [
        "### Per-step cost of KV cache groups (defaults, K = N)",
        "",
        "| engine (K = N: nothing withdrawn) | KV groups | decode ms/step | x stock | "
        "prefill tok/s | x stock |",
        "|---|---|---|---|---|---|",
    ]
    for name, groups, r in rows:
        lines.append(
            f"| {name} | {groups} | {fmt(r['decode_ms_per_step'], 2)} | "
            f"{over(r['decode_ms_per_step'], stock['decode_ms_per_step']):.2f}x | "
            f"{fmt(r['prefill_tok_s'], 0)} | "
            f"{over(r['prefill_tok_s'], stock['prefill_tok_s']):.2f}x |"
        )
    xs = [float(g) for _, g, _ in rows[1:]]
    ys = [r["decode_ms_per_step"]["median"] for _, _, r in rows[1:]]
    fit = {
        "ms_per_group": _slope(xs, ys),
        "stock_ms_per_step": stock["decode_ms_per_step"]["median"],
        "vtw_1group_over_stock_ms": ys[0] - stock["decode_ms_per_step"]["median"],
    }
    share = 100 * fit["ms_per_group"] / fit["stock_ms_per_step"]
    lines += [
        "",
        f"Least-squares slope over the VTW engines: **{fit['ms_per_group']:+.3f} ms per "
        f"decode step per extra KV group** ({share:+.1f}% "
        f"of stock's {fit['stock_ms_per_step']:.2f} ms step); VTW with one group (the "
        f"plugin's fixed cost) {fit['vtw_1group_over_stock_ms']:+.3f} ms vs stock.",
        "",
    ]
    return lines


def plot(ax: Any, kind: str, res: dict[str, Any]) -> None:
    """The plot's panel: decode ms/step against the number of KV groups."""
    n = res["vtw"]["num_layers"]
    names = ("vtw_1group", "vtw", "vtw_group_size2")
    groups = [res[m]["engine"]["kv_cache_groups"] for m in names]
    ms = [res[m]["per_k"][str(n)]["decode_ms_per_step"]["median"] for m in names]
    ax.plot(groups, ms, marker="o", label="VTW, K = N")
    stock_ms = res["stock"]["per_k"]["None"]["decode_ms_per_step"]["median"]
    ax.axhline(stock_ms, color="grey", linestyle=":", label="stock")
    ax.set_xlabel("KV cache groups")
    ax.set_ylabel("decode ms / step")
    ax.set_title(f"{kind}: per-step cost of KV groups")
    ax.legend(fontsize=7)
