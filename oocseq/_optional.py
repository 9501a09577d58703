"""Optional dependencies: a clear error naming the extra to install, instead of an ImportError
from deep inside a function."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

#: module -> (pip package, oocseq extra)
_PACKAGES = {
    "PIL": ("Pillow", "images"),
    "pandas": ("pandas", "csv"),
    "obstore.store": ("obstore", "remote"),
    "distributed": ("dask[distributed]", "dask"),
}


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (``"PIL"``, ``"pandas"`` or ``"distributed"``) for ``what`` (e.g. ``"ingest_csv"``).

    Raises:
        MissingDependencyError: it is not installed; the message names the extra to install.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package, extra = _PACKAGES[module]
        raise MissingDependencyError(
            f"{what} needs {package}, which is not installed: pip install 'oocseq[{extra}]' "
            f"(or pip install {package})"
        ) from e
