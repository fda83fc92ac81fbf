"""Weight encoders for TensorFlow Lite Micro's ``TFLM_DECODE`` op: one protocol, one dispatch table, one module
per encoding (``lut``, ``huffman``, ``prune``; what they share is in ``base``).

Each encoder turns an int8 weight array plus its channel layout into ``(encoded bytes, ancillary bytes)``:
the encoded bytes become a UINT8 tensor, the ancillary bytes a second UINT8 tensor that starts with the
16-byte DECODE common metadata (DCM) header::

    byte 0 decode type (0 LUT, 1 HUFFMAN, 2 PRUNE), byte 1 DCM version 1, bytes 2-3 zero,
    bytes 4-15 type specific, type data from byte 16.

Every encoder also decodes (the inverse, used by ``decode.describe`` and by tests). The runtime never
validates encoded data, so the formats below mirror what the TFLM decode kernels read, bit for bit.

* ``lut``     (type 0): per-channel value tables + ``b``-bit indices, MSB first. ``b`` bits per weight.
* ``huffman`` (type 1): canonical Huffman code, multi-level lookup tables, big-endian 32-bit word stream.
  Close to the entropy bound, floor 1 bit per weight.
* ``prune``   (type 2): 1-bit "not the fill value" map + the kept values. ``1 + 8 (1 - s)`` bits per weight
  at sparsity ``s``; works on any pruned int8 tensor.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .base import DCM_SIZE, ChannelLayout, Encoded, EncodingError
from .huffman import HuffmanEncoder, canonical_codes, huffman_code_lengths
from .lut import LutEncoder
from .prune import PruneEncoder

__all__ = [
    "DCM_SIZE",
    "ChannelLayout",
    "Encoded",
    "Encoder",
    "EncodingError",
    "LutEncoder",
    "HuffmanEncoder",
    "PruneEncoder",
    "ENCODERS",
    "get",
    "for_ancillary",
    "huffman_code_lengths",
    "canonical_codes",
]


class Encoder(Protocol):
    """The plugin protocol: a name, a DCM decode type, and an encode/decode pair over int8 arrays."""

    name: str
    decode_type: int

    def encode(self, values: np.ndarray, layout: ChannelLayout) -> Encoded:
        """Encode an int8 array (any shape, memory order) for the TFLM decode kernel."""
        ...

    def decode(self, data: bytes, ancillary: bytes, count: int, layout: ChannelLayout) -> np.ndarray:
        """The flat int8 array of ``count`` elements the runtime decodes from ``data``/``ancillary``."""
        ...


ENCODERS: dict[str, Encoder] = {e.name: e for e in (LutEncoder(), HuffmanEncoder(), PruneEncoder())}
_BY_TYPE: dict[int, Encoder] = {e.decode_type: e for e in ENCODERS.values()}


def get(name: str) -> Encoder:
    """The encoder called ``name``; a ValueError that lists the choices otherwise."""
    try:
        return ENCODERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown encoding {name!r}; choose one of {sorted(ENCODERS)}.") from None


def for_ancillary(ancillary: bytes) -> Encoder:
    """The encoder whose DCM decode type ``ancillary`` carries."""
    if len(ancillary) < DCM_SIZE:
        raise ValueError(f"ancillary data of {len(ancillary)} bytes is shorter than the {DCM_SIZE}-byte DCM header.")
    try:
        return _BY_TYPE[ancillary[0]]
    except KeyError:
        raise ValueError(f"decode type {ancillary[0]} is not one of {sorted(_BY_TYPE)}.") from None
