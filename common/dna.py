"""Deprecated location of the DNA example: it lives in :mod:`common.examples.dna`.

Plug-in paths such as ``common.dna:encoder`` in saved configs keep working, with a
``DeprecationWarning``; use ``common.examples.dna:encoder`` (or the built-in names
``dna`` and ``cnn1d``).
"""

from __future__ import annotations

import warnings
from typing import Any

from common.examples import dna as _dna


def __getattr__(name: str) -> Any:
    value = getattr(_dna, name)  # AttributeError for a name the example does not have
    warnings.warn(f"common.dna.{name} moved to common.examples.dna.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
