"""What the encoders share: the 16-byte DECODE common metadata (DCM) header, the channel layout of a weight tensor
and the pair of tensors an encoding produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DCM_SIZE", "DCM_VERSION", "EncodingError", "ChannelLayout", "Encoded", "dcm_header", "int8_values"]

DCM_SIZE = 16
DCM_VERSION = 1


class EncodingError(ValueError):
    """A tensor cannot be encoded with the requested encoding."""


@dataclass(frozen=True)
class ChannelLayout:
    """How the runtime maps the elements of a weight tensor to quantization channels.

    ``channels == 1``: one channel. Otherwise ``axis`` is 0 (channel = i div (N / C)) or the last axis
    ``rank - 1`` (channel = i mod C); the TFLM decode kernels support no other axis.
    ``zero_points`` has one entry per channel (or a single entry).
    """

    channels: int = 1
    axis: int = 0
    zero_points: tuple[int, ...] = (0,)

    @property
    def interleaved(self) -> bool:
        """True when consecutive elements belong to consecutive channels (last-axis quantization)."""
        return self.channels > 1 and self.axis != 0

    def channel_of(self, count: int) -> np.ndarray:
        """Channel index of each of the ``count`` elements in memory order."""
        index = np.arange(count, dtype=np.int64)
        if self.channels == 1:
            return np.zeros(count, dtype=np.int64)
        if self.interleaved:
            return index % self.channels
        return index // (count // self.channels)

    def by_channel(self, flat: np.ndarray) -> np.ndarray:
        """``flat`` (memory order) as a ``(channels, elements_per_channel)`` array."""
        if self.interleaved:
            return flat.reshape(-1, self.channels).T
        return flat.reshape(self.channels, -1)

    def to_memory_order(self, per_channel: np.ndarray) -> np.ndarray:
        """Inverse of ``by_channel``: a flat array in memory order."""
        return (per_channel.T if self.interleaved else per_channel).reshape(-1)

    def fill_values(self, count: int) -> np.ndarray:
        """The PRUNE fill value of each element: the per-channel zero point when the runtime uses them."""
        zero_points = np.asarray(self.zero_points, dtype=np.int64)
        if self.channels > 1 and len(zero_points) == self.channels and np.any(zero_points != 0):
            return zero_points[self.channel_of(count)].astype(np.int8)
        return np.full(count, zero_points[0], dtype=np.int8)


@dataclass(frozen=True)
class Encoded:
    """The two constant tensors that replace one weight tensor."""

    encoding: str
    data: bytes
    ancillary: bytes

    @property
    def payload_bytes(self) -> int:
        return len(self.data) + len(self.ancillary)


def dcm_header(decode_type: int, type_bytes: bytes) -> bytes:
    """The 16-byte DCM header: decode type, DCM version, two zero bytes, then the type specific bytes."""
    header = bytearray(DCM_SIZE)
    header[0] = decode_type
    header[1] = DCM_VERSION
    header[4 : 4 + len(type_bytes)] = type_bytes
    return bytes(header)


def int8_values(values: np.ndarray) -> np.ndarray:
    """``values`` as a flat int8 array (memory order); ``EncodingError`` for another dtype."""
    values = np.asarray(values)
    if values.dtype != np.int8:
        raise EncodingError(f"expected an int8 array, got dtype {values.dtype}.")
    return values.reshape(-1)
