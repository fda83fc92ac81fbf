"""Encoding ``lut`` (DCM decode type 0): per-channel value tables and ``b``-bit indices, MSB first."""

from __future__ import annotations

import numpy as np

from .base import DCM_SIZE, ChannelLayout, Encoded, EncodingError, dcm_header, int8_values

__all__ = ["LutEncoder"]


class LutEncoder:
    """LUT (type 0): ``byte 4`` version 1, ``byte 5`` = axis << 4 | index bits (axis 15: one table),
    ``byte 6`` table stride; per-channel value tables from byte 16 (stride 0: one table that every channel
    uses, written when all channels' values fit one table); indices MSB first."""

    name = "lut"
    decode_type = 0

    def __init__(self, index_bitwidth: int = 2) -> None:
        if not 1 <= index_bitwidth <= 7:
            raise ValueError(f"index_bitwidth must be 1..7 (TFLM LUT decode), got {index_bitwidth}.")
        self.index_bitwidth = index_bitwidth

    def encode(self, values: np.ndarray, layout: ChannelLayout) -> Encoded:
        flat = int8_values(values)
        rows = layout.by_channel(flat)
        tables = [np.unique(row) for row in rows]
        stride = max(len(t) for t in tables)
        capacity = 1 << self.index_bitwidth
        if stride > capacity:
            worst = int(np.argmax([len(t) for t in tables]))
            raise EncodingError(
                f"channel {worst} has {stride} distinct values; a {self.index_bitwidth}-bit LUT holds at most "
                f"{capacity}. Use encoding 'huffman' or 'prune', or ternarize the layer."
            )
        shared = np.unique(flat)
        if len(tables) > 1 and len(shared) <= capacity:
            # One table for every channel: stride 0 makes the decoder reuse it (a ternary layer's {-q, 0, +q}
            # is the same for all channels), instead of a copy per channel.
            tables, stride = [shared] * len(tables), 0
        indices = np.stack([np.searchsorted(t, row) for t, row in zip(tables, rows)])
        if stride == 0:
            padded = shared.astype(np.int8)
        else:
            padded = np.zeros((len(tables), stride), dtype=np.int8)
            for c, table in enumerate(tables):
                padded[c, : len(table)] = table
        axis = layout.axis if layout.channels > 1 else 15
        header = dcm_header(self.decode_type, bytes([1, (axis << 4) | self.index_bitwidth, stride]))
        data = _pack_msb_first(layout.to_memory_order(indices), self.index_bitwidth)
        return Encoded(self.name, data, header + padded.tobytes())

    def decode(self, data: bytes, ancillary: bytes, count: int, layout: ChannelLayout) -> np.ndarray:
        width, stride = ancillary[5] & 0x07, ancillary[6]
        values = np.frombuffer(ancillary[DCM_SIZE:], dtype=np.int8)
        indices = _unpack_msb_first(data, count, width)
        if stride == 0:  # one table for every channel
            return values[indices]
        tables = values[: len(values) // stride * stride].reshape(-1, stride)
        return tables[layout.channel_of(count), indices]


def _pack_msb_first(symbols: np.ndarray, width: int) -> bytes:
    """Pack unsigned ``symbols`` (< 2**width) as ``width``-bit fields, MSB first, padded to a whole byte."""
    bits = np.unpackbits(symbols.astype(np.uint8)[:, None], axis=1)[:, 8 - width :]
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_msb_first(data: bytes, count: int, width: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * width].reshape(count, width)
    weights = 1 << np.arange(width - 1, -1, -1)
    return bits.astype(np.int64) @ weights
