"""coremltools, imported quietly and at the version our code was verified with. Shared by the
Core ML exporter and the Core ML runtimes (neither imports the other).

Importing this module imports nothing heavy; `import_coremltools()` does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

from redrafter.errors import RedrafterError

COREMLTOOLS_VERSION = "9.0"  # the version the facts in docs/design.md §9 were measured with


class CoreMLToolsError(RedrafterError):
    """coremltools is missing or of a version our converter and MIL evaluator do not know."""


@contextlib.contextmanager
def quiet() -> Any:
    """coremltools logs a warning per op it broadcasts, draws progress bars and warns about the
    untested torch version on import; keep the CLI readable (the warnings are in docs/coreml.md)."""
    names = ("coremltools", "torch.export", "torch._dynamo", "torch.fx")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def import_coremltools() -> Any:
    """Import coremltools quietly and check its version (our converter and the MIL evaluator
    use its internals, verified with 9.0)."""
    try:
        with quiet():
            import coremltools as ct
    except ImportError:
        raise CoreMLToolsError(
            f"coremltools is not installed; pip install coremltools=={COREMLTOOLS_VERSION}"
        ) from None
    if ct.__version__.split(".")[0] != COREMLTOOLS_VERSION.split(".")[0]:
        raise CoreMLToolsError(
            f"coremltools {ct.__version__} is not supported; "
            f"pip install coremltools=={COREMLTOOLS_VERSION}"
        )
    return ct
