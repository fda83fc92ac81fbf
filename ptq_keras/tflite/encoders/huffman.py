"""Encoding ``huffman`` (DCM decode type 1): a canonical Huffman code read through multi-level lookup tables."""

from __future__ import annotations

import heapq

import numpy as np

from .base import DCM_SIZE, ChannelLayout, Encoded, EncodingError, dcm_header, int8_values

__all__ = ["HuffmanEncoder", "huffman_code_lengths", "canonical_codes"]


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
        flat = int8_values(values)
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
        header = dcm_header(self.decode_type, bytes([1, ((root - 1) << 4) | int(wide)]))
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
