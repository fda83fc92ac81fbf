"""The versions of the stack ptq_keras supports, checked from the installed distributions' metadata (nothing is
imported): ``import ptq_keras`` warns about a version outside the tested ranges, and the tf_keras frontend refuses a
tf_keras whose minor version differs from TensorFlow's (tf_keras 2.N only runs on TensorFlow 2.N). Each message
names the fix. The tested matrix: ``make test-matrix`` (docs/results/matrix.md)."""

from __future__ import annotations

import re
import warnings
from importlib import metadata

# distribution -> (lowest supported, first unsupported) release, as (major, minor); the ranges of setup.cfg
SUPPORTED = {
    "tensorflow": ((2, 19), (2, 22)),
    "tf-keras": ((2, 19), (2, 22)),
    "tensorflow-model-optimization": ((0, 8), (0, 9)),
    "numpy": ((1, 26), (3, 0)),
}



class VersionWarning(UserWarning):
    """A package of the stack is outside the versions ptq_keras is tested with."""


def installed(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def minor(version: str) -> tuple[int, int] | None:
    """``"2.21.0rc1"`` -> ``(2, 21)``; None for a version without two leading numbers."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def unsupported() -> list[str]:
    """One line per installed package of :data:`SUPPORTED` outside its range, with the pip command that fixes it."""
    problems = []
    for name, (low, high) in SUPPORTED.items():
        version = installed(name)
        parsed = minor(version) if version else None
        if parsed is not None and not low <= parsed < high:
            problems.append(
                f"{name} {version} is outside the versions ptq_keras supports ({_range(low, high)}); "
                f'fix: pip install "{name}>={low[0]}.{low[1]},<{high[0]}.{high[1]}"'
            )
    return problems


def check() -> None:
    """Warn (:class:`VersionWarning`, once per package) about each package outside the supported ranges."""
    for line in unsupported():
        warnings.warn(line, VersionWarning, stacklevel=3)


def tf_keras_mismatch() -> str | None:
    """The error message when tf_keras and TensorFlow differ in minor version, else None."""
    tf_version, keras_version = installed("tensorflow"), installed("tf-keras")
    if not tf_version or not keras_version:
        return None
    tf_minor, keras_minor = minor(tf_version), minor(keras_version)
    if tf_minor is None or keras_minor is None or tf_minor == keras_minor:
        return None
    return (
        f"tf-keras {keras_version} does not run on tensorflow {tf_version}: tf-keras 2.N needs tensorflow 2.N. "
        f'Fix: pip install "tf-keras~={tf_minor[0]}.{tf_minor[1]}.0" (or install the tensorflow that matches it).'
    )


def _range(low: tuple[int, int], high: tuple[int, int]) -> str:
    return f">={low[0]}.{low[1]}, <{high[0]}.{high[1]}"


__all__ = ["SUPPORTED", "VersionWarning", "check", "installed", "minor", "tf_keras_mismatch", "unsupported"]
