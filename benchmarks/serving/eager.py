"""Part ``eager`` of the serving benchmark (``run.py --parts eager``).

Stock and VTW both with ``enforce_eager=True`` and prefix caching off (the setting of the
earlier runs); VTW with layer groups of 2 at every K in ``--ks`` and N. The engines
(``stock_eager`` and ``vtw_eager``: ``common.engine_spec``) and what they measure:
``common.py``.
"""

from __future__ import annotations

from typing import Any

from common import offline_table


def section(kind: str, res: dict[str, Any]) -> list[str]:
    """The report's section: stock vs VTW per K, both eager."""
    return [
        "### Eager: enforce_eager=True and prefix caching off, both (VTW layer groups of 2)",
        "",
        *offline_table(kind, res["stock_eager"], res["vtw_eager"]),
        "",
    ]
