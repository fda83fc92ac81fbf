"""Encoding ``prune`` (DCM decode type 2): a 1-bit "not the fill value" map and the kept values."""

from __future__ import annotations

import numpy as np

from .base import DCM_SIZE, ChannelLayout, Encoded, dcm_header, int8_values

__all__ = ["PruneEncoder"]


class PruneEncoder:
    """PRUNE (type 2): ``byte 4`` version 1; the kept values (not the fill value) from byte 16 in memory
    order; encoded tensor = 1 bit per element, MSB first, 1 = next kept value, 0 = fill value."""

    name = "prune"
    decode_type = 2

    def encode(self, values: np.ndarray, layout: ChannelLayout) -> Encoded:
        flat = int8_values(values)
        keep = flat != layout.fill_values(flat.size)
        data = np.packbits(keep).tobytes()
        return Encoded(self.name, data, dcm_header(self.decode_type, bytes([1])) + flat[keep].tobytes())

    def decode(self, data: bytes, ancillary: bytes, count: int, layout: ChannelLayout) -> np.ndarray:
        keep = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:count].astype(bool)
        out = layout.fill_values(count)
        out[keep] = np.frombuffer(ancillary[DCM_SIZE:], dtype=np.int8)[: int(keep.sum())]
        return out
