"""Progress bars for long work (tqdm), silenced when ``progress=False``."""

from __future__ import annotations

from typing import Any


def progress_bar(enabled: bool, total: int | None, desc: str, unit: str = "sample") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, leave=False)
