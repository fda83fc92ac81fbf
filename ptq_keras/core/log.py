"""The package's logger, ``logging.getLogger("ptq_keras")``: progress and facts as ``ptq_keras: <message>`` lines on
standard output, at level INFO. Silence them with ``logging.getLogger("ptq_keras").setLevel(logging.WARNING)``, or
give the logger your own handlers. Advice a user may act on is a ``warnings.warn`` instead (filterable)."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("ptq_keras")


class _Stdout(logging.StreamHandler):
    """Writes to the ``sys.stdout`` of the moment (so redirections and captured output see it)."""

    def emit(self, record):
        self.stream = sys.stdout
        super().emit(record)


if not logger.handlers:
    _handler = _Stdout()
    _handler.setFormatter(logging.Formatter("ptq_keras: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line per message, also where the application configures the root logger


def info(message: str) -> None:
    logger.info(message)


def script_logger(name: str, tag: str = "") -> logging.Logger:
    """The progress logger of a script: ``logging.getLogger("ptq_keras.<name>")``, lines ``[<tag> HH:MM:SS] <message>``
    on standard output. A child of the package's logger, so ``logging.getLogger("ptq_keras").setLevel(...)``
    silences the scripts' progress and the library's alike."""
    child = logging.getLogger(f"ptq_keras.{name}")
    if not child.handlers:
        handler = _Stdout()
        handler.setFormatter(logging.Formatter(f"[{tag + ' ' if tag else ''}%(asctime)s] %(message)s", "%H:%M:%S"))
        child.addHandler(handler)
        child.propagate = False  # its own format, not the package's "ptq_keras: " lines
    return child
