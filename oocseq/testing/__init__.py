"""Test kit for users' own pipelines: hypothesis strategies, assertions, a Keras fit recorder
and a store conformance suite.

- :mod:`oocseq.testing.strategies` (needs ``hypothesis``: ``pip install oocseq[testing]``):
  field specs, index-encoding stores written to a temporary directory, sequence arguments
  (batch size, window, seed, rank / world_size, workers) and plans.
- :mod:`oocseq.testing.assertions`: :func:`assert_exactly_once`,
  :func:`assert_matches_source`, :func:`assert_deterministic`, :func:`assert_bounded_work`,
  over the public API only.
- :class:`FitRecorder` (:mod:`oocseq.testing.keras`; imports Keras): records the sample ids
  every ``fit`` / ``evaluate`` / ``predict`` step received.
- :class:`StoreContract` (:mod:`oocseq.testing.contract`; pytest + hypothesis): a conformance
  suite a store (a format, a backend, a transform) inherits and runs.

Importing ``oocseq.testing`` imports neither hypothesis nor Keras; each name loads its module on
first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "assert_exactly_once": "assertions",
    "assert_matches_source": "assertions",
    "assert_deterministic": "assertions",
    "assert_bounded_work": "assertions",
    "epoch_ids": "assertions",
    "serve_epoch": "assertions",
    "decode_x": "stores",
    "index_encoding_fields": "stores",
    "write_index_store": "stores",
    "FitRecorder": "keras",
    "StoreContract": "contract",
    "strategies": None,
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'oocseq.testing' has no attribute {name!r}")
    module = _LAZY[name]
    if module is None:
        return importlib.import_module(f"{__name__}.{name}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
