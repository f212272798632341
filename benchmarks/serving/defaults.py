"""Part ``defaults`` of the serving benchmark, the headline (``run.py --parts defaults``).

Stock vLLM and VTW both at vLLM's defaults: torch.compile on, neither ``enforce_eager``
nor ``enable_prefix_caching`` passed; what each engine actually ran with is read back
from its config and reported. VTW deploys ``vtw_allowed_k`` [N/2, N] (two KV cache
groups) and is measured at K = N/2 and K = N (per-request ``extra_args``). Pass/fail
lines for the bars on the LLaVA-1.5-shaped checkpoint. The engines (``stock`` and
``vtw``: ``common.engine_spec``) and what they measure: ``common.py``.
"""

from __future__ import annotations

from typing import Any

from common import offline_table, over


def bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The bars on the LLaVA-1.5-shaped checkpoint, VTW vs stock both at defaults."""
    if "vtw" not in results.get("llava", {}):
        return []
    stock = results["llava"]["stock"]["per_k"]["None"]
    vtw = results["llava"]["vtw"]
    n = vtw["num_layers"]
    checks = [(n // 2, "decode_tok_s", 1.0), (n // 2, "prefill_tok_s", 1.7)]
    checks += [(n, "prefill_tok_s", 0.97), (n, "decode_tok_s", 0.97)]
    out = []
    for k, metric, bar in checks:
        value = over(vtw["per_k"][str(k)][metric], stock[metric])
        out.append({"k": k, "metric": metric, "ratio": value, "bar": bar, "pass": value >= bar})
    return out


def section(kind: str, res: dict[str, Any], verdicts: list[dict[str, Any]]) -> list[str]:
    """The report's section: stock vs VTW per K, then (LLaVA-1.5-shaped) the bars
    (``verdicts``: what :func:`bars` returned)."""
    allowed = res["vtw"]["engine"]["allowed_k"]
    lines = [
        f"### At vLLM's defaults: stock vs VTW (vtw_allowed_k {allowed}, "
        f"{res['vtw']['engine']['kv_cache_groups']} KV groups)",
        "",
        *offline_table(kind, res["stock"], res["vtw"]),
        "",
    ]
    if kind == "llava":
        lines += ["Bars (LLaVA-1.5-shaped, both at defaults):", ""]
        for b in verdicts:
            verdict = "PASS" if b["pass"] else "FAIL"
            lines.append(
                f"- {verdict}: K={b['k']} {b['metric'].split('_')[0]} "
                f"{b['ratio']:.2f}x stock (bar >= {b['bar']}x)"
            )
        lines.append("")
    return lines
