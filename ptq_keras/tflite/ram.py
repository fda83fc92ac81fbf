"""TFLM arena of target ``micro``: the split bound of ``max_decode_bytes="auto"`` and ``fit_ram`` (``ram_budget``).

Each ``TFLM_DECODE`` output (a decoded weight tensor) lives in the arena while its consumer runs: splitting large
weights (``split``) bounds that buffer, and a weight left plain int8 needs none. ``auto_decode_bytes`` picks a bound
from the int8 file's own arena; ``fit_ram`` measures candidates on TFLM until one fits a budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import decode, flatbuffer, micro
from .checks import ExportError

__all__ = ["AUTO_DECODE_FLOOR", "RamFit", "auto_decode_bytes", "decode_bounds", "fit_ram"]

AUTO_DECODE_FLOOR = 16384  # max_decode_bytes="auto" never splits a weight tensor of at most this many bytes
_SMALLEST_BOUND = 1024  # fit_ram tries split bounds down to this many bytes


def auto_decode_bytes(int8: bytes) -> int:
    """The split bound ``max_decode_bytes="auto"`` picks for a model: half of its ``int8`` file's TFLM arena (the
    activations' own need, from TFLM's allocation report), at least ``AUTO_DECODE_FLOOR``. The decode buffer then
    adds at most about half to the arena, and a layer splits into few parts (each part costs per-op memory)."""
    arena = micro._report_total(micro.allocation_report(int8))
    return max(AUTO_DECODE_FLOOR, arena // 2 // 1024 * 1024)


@dataclass
class RamFit:
    """How target ``micro`` was fitted into ``ram_budget`` bytes of TFLM arena (``fit_ram``)."""

    ram_budget: int
    arena_bytes: int  # of the file returned
    max_decode_bytes: int | None  # the split bound chosen (None: no split needed)
    keep_int8: int  # weight tensors left as plain int8 (no decode buffer)
    tried: list = field(default_factory=list)  # (max_decode_bytes, keep_int8, arena bytes) in the order tried


def decode_bounds(int8_model) -> list[int | None]:
    """The split bounds ``fit_ram`` tries, in order: None (no split), then powers of two halving from half the
    largest weight tensor of the parsed int8 file down to 1 KiB (fewer, larger parts first: less per-op overhead)."""
    largest = max(decode.weight_sizes(int8_model), default=0)
    bounds = [None]
    bound = 1 << max(int(largest // 2).bit_length() - 1, 0)
    while bound >= _SMALLEST_BOUND:
        bounds.append(bound)
        bound //= 2
    return bounds


def fit_ram(convert_with, int8: bytes, ram_budget: int, say=None):
    """``(conversion, RamFit)``: the first ``micro`` conversion whose measured TFLM arena is at most ``ram_budget``
    bytes. ``convert_with(max_decode_bytes, keep_int8)`` converts the model of the ``int8`` file (its result's
    ``tflite`` holds the bytes).

    Tried in order, the first that fits wins: the bounds of ``decode_bounds``; then, with the bound that gave the
    smallest arena and then without a split, the largest weight tensors kept as plain int8 one by one (no decode
    buffer, more flash). An unreachable budget is an ``ExportError`` stating the smallest arena reached (at worst
    every weight int8 without a split: the activations' own need).
    """
    say = say or (lambda line: None)
    base = flatbuffer.read(int8, "int8 .tflite")
    fit = RamFit(ram_budget, 0, None, 0)

    def attempt(bound, keep):
        result = convert_with(bound, keep)
        arena = micro.measure_arena(result.tflite)
        fit.tried.append((bound, keep, arena))
        say(f"  ram_budget {ram_budget:,} B: max_decode_bytes={bound}, {keep} tensor(s) int8 -> arena {arena:,} B")
        if arena > ram_budget:
            return None
        fit.arena_bytes, fit.max_decode_bytes, fit.keep_int8 = arena, bound, keep
        return result, fit

    for bound in decode_bounds(base):
        found = attempt(bound, 0)
        if found:
            return found
    best = min(fit.tried, key=lambda t: t[2])[0]  # the first bound with the smallest arena
    for keep in range(1, decode.weight_count(base) + 1):
        for bound in dict.fromkeys((best, None)):  # split parts cost per-op memory: also try without
            found = attempt(bound, keep)
            if found:
                return found
    raise _unreachable(ram_budget, fit.tried)


def _unreachable(ram_budget: int, tried: list) -> ExportError:
    smallest = min(t[2] for t in tried)
    return ExportError(
        f"target 'micro': ram_budget={ram_budget:,} B cannot be met: the smallest TFLM arena reached is "
        f"{smallest:,} B (every weight left plain int8, no split: {tried[-1][2]:,} B, the activations' own "
        f"need). Raise ram_budget to at least {smallest:,}, or make the activations smaller (fewer channels, a "
        "smaller input)."
    )
