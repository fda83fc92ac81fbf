"""Weight encoders for TensorFlow Lite Micro's ``TFLM_DECODE`` op: one protocol, one dispatch table.

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

import heapq
from dataclasses import dataclass
from typing import Protocol

import numpy as np

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

DCM_SIZE = 16
_DCM_VERSION = 1


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


def _dcm(decode_type: int, type_bytes: bytes) -> bytes:
    header = bytearray(DCM_SIZE)
    header[0] = decode_type
    header[1] = _DCM_VERSION
    header[4 : 4 + len(type_bytes)] = type_bytes
    return bytes(header)


def _int8(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != np.int8:
        raise EncodingError(f"expected an int8 array, got dtype {values.dtype}.")
    return values.reshape(-1)


def _pack_msb_first(symbols: np.ndarray, width: int) -> bytes:
    """Pack unsigned ``symbols`` (< 2**width) as ``width``-bit fields, MSB first, padded to a whole byte."""
    bits = np.unpackbits(symbols.astype(np.uint8)[:, None], axis=1)[:, 8 - width :]
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_msb_first(data: bytes, count: int, width: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * width].reshape(count, width)
    weights = 1 << np.arange(width - 1, -1, -1)
    return bits.astype(np.int64) @ weights


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
        flat = _int8(values)
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
        header = _dcm(self.decode_type, bytes([1, (axis << 4) | self.index_bitwidth, stride]))
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


class PruneEncoder:
    """PRUNE (type 2): ``byte 4`` version 1; the kept values (not the fill value) from byte 16 in memory
    order; encoded tensor = 1 bit per element, MSB first, 1 = next kept value, 0 = fill value."""

    name = "prune"
    decode_type = 2

    def encode(self, values: np.ndarray, layout: ChannelLayout) -> Encoded:
        flat = _int8(values)
        keep = flat != layout.fill_values(flat.size)
        data = np.packbits(keep).tobytes()
        return Encoded(self.name, data, _dcm(self.decode_type, bytes([1])) + flat[keep].tobytes())

    def decode(self, data: bytes, ancillary: bytes, count: int, layout: ChannelLayout) -> np.ndarray:
        keep = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:count].astype(bool)
        out = layout.fill_values(count)
        out[keep] = np.frombuffer(ancillary[DCM_SIZE:], dtype=np.int8)[: int(keep.sum())]
        return out


def huffman_code_lengths(counts: np.ndarray) -> np.ndarray:
    """Optimal (Huffman) code lengths for symbol ``counts``; a lone symbol gets length 1."""
    if len(counts) == 1:
        return np.ones(1, dtype=np.int64)
    heap = [(int(c), i, [i]) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    lengths = np.zeros(len(counts), dtype=np.int64)
    tie = len(counts)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes for ``lengths`` (symbols in the order given, ties by position)."""
    order = np.lexsort((np.arange(len(lengths)), lengths))
    codes = np.zeros(len(lengths), dtype=np.uint64)
    code, previous = 0, int(lengths[order[0]])
    for rank, s in enumerate(order):
        length = int(lengths[s])
        if rank:
            code = (code + 1) << (length - previous)
        codes[s], previous = code, length
    return codes


class HuffmanEncoder:
    """HUFFMAN (type 1): ``byte 4`` version 1, ``byte 5`` = (root bits - 1) << 4 | 32-bit-entries flag;
    lookup tables from byte 16 (root first), little-endian uint16 (or uint32) entries:

    * symbol: found bit (15 / 31) set, count (bits 14-11 / 30-27) = bits of this lookup that belong to
      the code, value (low bits) = the int8 symbol as a byte;
    * pointer: found bit clear, the next lookup reads count + 1 bits, the next table starts at
      (this entry's index + value).

    The encoded tensor is the MSB-first code stream as big-endian 32-bit words, padded so every lookup
    can read a full table width, plus one guard word.
    """

    name = "huffman"
    decode_type = 1

    def __init__(
        self,
        max_root_bits: int = 8,
        max_sub_bits: int = 8,
        one_bit_root_probability: float = 0.6,
        table32: bool = False,
    ) -> None:
        """``max_root_bits`` / ``max_sub_bits`` (1-15): widest root / sub-table lookup; a 1-bit root when the
        most frequent value has a 1-bit code and probability >= ``one_bit_root_probability`` (fewer lookups
        for sparse tensors); ``table32`` forces 32-bit entries (otherwise only when an offset needs them)."""
        for label, bits in (("max_root_bits", max_root_bits), ("max_sub_bits", max_sub_bits)):
            if not 1 <= bits <= 15:
                raise ValueError(f"{label} must be 1..15 (a table entry counts at most 15 bits), got {bits}.")
        self.max_root_bits, self.max_sub_bits = max_root_bits, max_sub_bits
        self.one_bit_root_probability, self.table32 = one_bit_root_probability, table32

    def encode(self, values: np.ndarray, layout: ChannelLayout) -> Encoded:
        flat = _int8(values)
        symbols, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        lengths = huffman_code_lengths(counts)
        if lengths.max() > 56:
            raise EncodingError(f"Huffman code lengths reach {lengths.max()} bits (at most 56 supported).")
        codes = canonical_codes(lengths)
        top = int(np.argmax(counts))
        if counts[top] >= self.one_bit_root_probability * flat.size and lengths[top] == 1:
            root = 1
        else:
            root = int(min(lengths.max(), self.max_root_bits))
        entries, max_width = self._tables(symbols, codes, lengths, root)
        wide = self.table32 or any(e[0] == "ptr" and e[2] > 0x7FF for e in entries)
        table = np.array([self._entry(e, wide) for e in entries], dtype="<u4" if wide else "<u2")
        header = _dcm(self.decode_type, bytes([1, ((root - 1) << 4) | int(wide)]))
        return Encoded(self.name, self._stream(codes[inverse], lengths[inverse], max_width), header + table.tobytes())

    def _tables(self, symbols: np.ndarray, codes: np.ndarray, lengths: np.ndarray, root: int) -> tuple[list, int]:
        """Flat list of entries ("sym", value, bits) / ("ptr", width, offset); widest lookup."""
        entries: list = []
        widths = [root]

        def emit(group: list[tuple[int, int, int]], consumed: int, width: int) -> int:
            start = len(entries)
            entries.extend([None] * (1 << width))
            subgroups: dict[int, list[tuple[int, int, int]]] = {}
            for value, code, length in group:
                rest = length - consumed
                if rest <= width:
                    base = (code & ((1 << rest) - 1)) << (width - rest)
                    for k in range(1 << (width - rest)):
                        entries[start + base + k] = ("sym", value, rest)
                else:
                    index = (code >> (rest - width)) & ((1 << width) - 1)
                    subgroups.setdefault(index, []).append((value, code, length))
            for index, sub in sorted(subgroups.items()):
                sub_width = min(max(length for _, _, length in sub) - consumed - width, self.max_sub_bits)
                widths.append(sub_width)
                entries[start + index] = ("ptr", sub_width, emit(sub, consumed + width, sub_width) - start - index)
            return start

        group = [(int(v) & 0xFF, int(c), int(n)) for v, c, n in zip(symbols, codes, lengths)]
        emit(group, 0, root)
        # Only a lone symbol leaves entries unused (its code "0" never reaches them).
        entries = [e if e is not None else ("sym", group[0][0], 1) for e in entries]
        return entries, max(widths)

    @staticmethod
    def _entry(entry: tuple, wide: bool) -> int:
        kind, a, b = entry
        found, shift = (0x80000000, 27) if wide else (0x8000, 11)
        if kind == "sym":
            return found | (b << shift) | a
        return ((a - 1) << shift) | b

    @staticmethod
    def _stream(codes: np.ndarray, lengths: np.ndarray, max_width: int) -> bytes:
        total = int(lengths.sum())
        words = -(-(total + max_width) // 32) + 1
        bits = np.zeros(words * 32, dtype=np.uint8)
        starts = np.cumsum(lengths) - lengths
        for j in range(int(lengths.max())):
            has = lengths > j
            shift = (lengths[has] - 1 - j).astype(np.uint64)
            bits[starts[has] + j] = ((codes[has] >> shift) & np.uint64(1)).astype(np.uint8)
        # An MSB-first bit stream packed bytewise is exactly the big-endian 32-bit word stream.
        return np.packbits(bits).tobytes()

    def decode(self, data: bytes, ancillary: bytes, count: int, layout: ChannelLayout) -> np.ndarray:
        codebook = self.codebook(ancillary)
        longest = max(length for _, _, length in codebook)
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        positions = len(bits)
        bits = np.concatenate([bits, np.zeros(longest, dtype=np.uint8)])
        window = np.zeros(positions, dtype=np.uint64)
        for j in range(longest):
            window = (window << np.uint64(1)) | bits[j : j + positions]
        size = np.zeros(positions + 1, dtype=np.int64)
        symbol = np.zeros(positions, dtype=np.int8)
        for length in sorted({n for _, _, n in codebook}):
            book = sorted((c, v) for v, c, n in codebook if n == length)
            book_codes = np.array([c for c, _ in book], dtype=np.uint64)
            prefix = window >> np.uint64(longest - length)
            at = np.minimum(np.searchsorted(book_codes, prefix), len(book) - 1)
            hit = (book_codes[at] == prefix) & (size[:-1] == 0)
            size[:-1][hit] = length
            symbol[hit] = np.array([v for _, v in book], dtype=np.uint8).view(np.int8)[at[hit]]
        # Follow the chain start -> start + code length for all elements at once by pointer doubling.
        jump = np.minimum(np.arange(positions + 1) + size, positions)
        jump[positions] = positions
        start = np.zeros(1, dtype=np.int64)
        while len(start) < count:
            start = np.concatenate([start, jump[start]])
            jump = jump[jump]
        return symbol[np.minimum(start[:count], positions - 1)]

    @staticmethod
    def codebook(ancillary: bytes) -> list[tuple[int, int, int]]:
        """``(symbol byte, code, length)`` for every code in the lookup tables of an ancillary tensor."""
        wide = bool(ancillary[5] & 1)
        table = np.frombuffer(ancillary[DCM_SIZE:], dtype="<u4" if wide else "<u2").astype(np.int64)
        found, shift, value_mask = (0x80000000, 27, 0x07FFFFFF) if wide else (0x8000, 11, 0x07FF)
        book: dict[tuple[int, int], int] = {}

        def walk(start: int, width: int, prefix: int, prefix_bits: int) -> None:
            if prefix_bits + width > 32 or start + (1 << width) > len(table):
                raise ValueError(f"a Huffman lookup table at entry {start} runs past the tables or past 32 bits.")
            for index in range(1 << width):
                entry = int(table[start + index])
                bits = (entry >> shift) & 0x0F
                if entry & found:
                    code = (prefix << bits) | (index >> (width - bits))
                    book[(code, prefix_bits + bits)] = entry & 0xFF
                else:
                    walk(start + index + (entry & value_mask), bits + 1, (prefix << width) | index, prefix_bits + width)

        walk(0, (ancillary[5] >> 4) + 1, 0, 0)
        return [(value, code, length) for (code, length), value in book.items()]


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
