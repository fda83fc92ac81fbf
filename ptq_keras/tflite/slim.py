"""The ``micro`` file as TFLM reads it: only what the runtime uses, every repeated piece written once.

On a model of a few tens of thousands of weights the flatbuffer's wrapping (tensor names, metadata, one empty
buffer per activation, one copy of each shape, quantization table and option table per tensor or op) can outweigh
the ternary weights themselves. Two steps remove it, each checked bit-exact against the ``int8`` file on TFLM by
the tests:

* :func:`slim_model` edits the parsed model: names, signatures, metadata and the description dropped (unless
  ``keep_names``), ``shape_signature`` and ``min``/``max`` dropped (TFLM reads neither), identical constant tensors
  merged (e.g. the ``TFLM_DECODE`` value tables shared by every ternary layer), every tensor without data pointed at
  the empty buffer 0 and the buffers renumbered.
* :func:`write` serializes with sharing: one copy of each identical vector (shapes, scales, zero points, constant
  data, strings) and of each identical quantization or option table, constant data 16-byte aligned as TFLM
  requires (no re-layout pass).

:func:`trim_model` (target ``micro``) also drops the quantization parameters no TFLM kernel reads.

:func:`breakdown` tells where a file's bytes go (weights, biases, scales, zero points, names, metadata, structure).
"""

from __future__ import annotations

import flatbuffers
import numpy as np

from . import flatbuffer

__all__ = ["slim_model", "trim_model", "trim_for_tflm", "write", "slim", "breakdown", "PARTS"]

S = flatbuffer.schema
_WEIGHT_OPS = flatbuffer.WEIGHT_OPS
_ALIGN = 16  # TFLM's alignment for constant tensor data
PARTS = ("weights", "biases", "scales", "zero_points", "names", "metadata", "structure")


# ----------------------------------------------------------------------------- model edits
def slim_model(model: S.ModelT, keep_names: bool = False) -> None:
    """Drop what TFLM never reads and merge repeated constants, in place (see the module docstring)."""
    if not keep_names:
        for graph in model.subgraphs:
            graph.name = None
            for tensor in graph.tensors:
                tensor.name = None
        model.signatureDefs = None
        model.description = None
        model.metadata = None
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            tensor.shapeSignature = None
            q = tensor.quantization
            if q is not None:
                q.min = q.max = None
                if (q.scale is None or len(q.scale) == 0) and (q.zeroPoint is None or len(q.zeroPoint) == 0):
                    tensor.quantization = None
    _merge_constants(model)
    _renumber_buffers(model)


def _quantization_key(q) -> tuple:
    if q is None:
        return ()
    return (
        None if q.scale is None else np.asarray(q.scale, np.float32).tobytes(),
        None if q.zeroPoint is None else np.asarray(q.zeroPoint, np.int64).tobytes(),
        int(q.quantizedDimension or 0),
    )


def _merge_constants(model: S.ModelT) -> None:
    """Point every op at one tensor per distinct constant (same data, type, shape, quantization and name)."""
    for graph in model.subgraphs:
        io = {int(i) for i in _indices(graph.inputs)} | {int(i) for i in _indices(graph.outputs)}
        first: dict[tuple, int] = {}
        remap: dict[int, int] = {}
        for i, t in enumerate(graph.tensors):
            data = model.buffers[t.buffer].data if 0 < t.buffer < len(model.buffers) else None
            if data is None or len(data) == 0 or i in io or t.isVariable:
                continue
            key = (
                np.asarray(data, np.uint8).tobytes(),
                int(t.type),
                tuple(int(d) for d in (t.shape if t.shape is not None else [])),
                _quantization_key(t.quantization),
                flatbuffer.tensor_name(t),
            )
            remap[i] = first.setdefault(key, i)
        if not any(k != v for k, v in remap.items()):
            continue
        for op in graph.operators or []:
            if op.inputs is not None:
                op.inputs = np.array([remap.get(int(x), int(x)) for x in op.inputs], dtype=np.int32)
        _drop_unused_tensors(graph)


def _drop_unused_tensors(graph) -> None:
    used = {int(i) for op in graph.operators or [] for i in _indices(op.inputs) + _indices(op.outputs) if int(i) >= 0}
    used |= {int(i) for i in _indices(graph.inputs)} | {int(i) for i in _indices(graph.outputs)}
    keep = [i for i in range(len(graph.tensors)) if i in used]
    new = {old: n for n, old in enumerate(keep)}
    graph.tensors = [graph.tensors[i] for i in keep]

    def renumber(values):
        return np.array([new[int(v)] if int(v) >= 0 else int(v) for v in values], dtype=np.int32)

    for op in graph.operators or []:
        op.inputs, op.outputs = renumber(_indices(op.inputs)), renumber(_indices(op.outputs))
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = renumber(op.intermediates)
    graph.inputs, graph.outputs = renumber(_indices(graph.inputs)), renumber(_indices(graph.outputs))


def _indices(values) -> list:
    """A subgraph's or op's tensor index vector as a list (an absent vector is empty)."""
    return [] if values is None else list(values)


def _renumber_buffers(model: S.ModelT) -> None:
    """Buffer 0 empty; one buffer per distinct constant; tensors without data (and dropped metadata) use none."""
    empty = S.BufferT()
    buffers, index = [empty], {}

    def place(old: int) -> int:
        data = model.buffers[old].data if 0 <= old < len(model.buffers) else None
        if data is None or len(data) == 0:
            if model.buffers[old].offset:  # data outside the flatbuffer: keep as is
                buffers.append(model.buffers[old])
                return len(buffers) - 1
            return 0
        key = np.asarray(data, np.uint8).tobytes()
        if key not in index:
            buffers.append(model.buffers[old])
            index[key] = len(buffers) - 1
        return index[key]

    for graph in model.subgraphs:
        for tensor in graph.tensors:
            tensor.buffer = place(int(tensor.buffer))
    for entry in model.metadata or []:
        entry.buffer = place(int(entry.buffer))
    model.buffers = buffers


# ----------------------------------------------------------------------------- serialization with sharing
class _SharingBuilder(flatbuffers.Builder):
    """A builder that writes each distinct numpy vector and string once; uint8 vectors (constant tensor data)
    start on a 16-byte boundary of the file."""

    def __init__(self) -> None:
        super().__init__(1024)
        self._vectors: dict[tuple, int] = {}

    def CreateNumpyVector(self, x):  # noqa: N802 (the flatbuffers API's name)
        x = np.ascontiguousarray(x)
        key = (x.dtype.str, x.size, x.tobytes())
        if key in self._vectors:
            return self._vectors[key]
        if x.dtype == np.uint8:
            payload = x.tobytes()
            self.StartVector(1, len(payload), _ALIGN)
            self.head -= len(payload)
            self.Bytes[self.head : self.head + len(payload)] = payload
            offset = self.EndVector()
        else:
            offset = super().CreateNumpyVector(x)
        self._vectors[key] = offset
        return offset

    def CreateString(self, s, encoding="utf-8", errors="strict"):  # noqa: N802
        key = ("str", s if isinstance(s, bytes) else str(s).encode(encoding, errors))
        if key not in self._vectors:
            self._vectors[key] = super().CreateString(s, encoding, errors)
        return self._vectors[key]


class _Shared:
    """Stands in for a table object: packs it once per builder and key, then returns the same offset."""

    def __init__(self, table, key: tuple, cache: dict) -> None:
        self.table, self.key, self.cache = table, key, cache

    def Pack(self, builder):  # noqa: N802 (the object API's name)
        if self.key not in self.cache:
            self.cache[self.key] = self.table.Pack(builder)
        return self.cache[self.key]


def _options_key(options) -> tuple:
    return (type(options).__name__,) + tuple(
        (k, np.asarray(v).tobytes() if isinstance(v, (np.ndarray, list)) else v)
        for k, v in sorted(vars(options).items())
    )


def write(model: S.ModelT) -> bytes:
    """Serialize ``model`` with one copy of each identical vector, string, quantization and option table, and
    16-byte aligned constant data (TFLM reads it in place)."""
    cache: dict[tuple, int] = {}
    saved = []
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            if tensor.quantization is not None:
                saved.append((tensor, "quantization", tensor.quantization))
                key = ("q",) + _quantization_key(tensor.quantization) + (repr(vars(tensor.quantization)),)
                tensor.quantization = _Shared(tensor.quantization, key, cache)
        for op in graph.operators or []:
            if op.builtinOptions is not None:
                saved.append((op, "builtinOptions", op.builtinOptions))
                key = ("o", int(op.builtinOptionsType)) + _options_key(op.builtinOptions)
                op.builtinOptions = _Shared(op.builtinOptions, key, cache)
    try:
        builder = _SharingBuilder()
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())
    finally:
        for owner, attribute, value in saved:
            setattr(owner, attribute, value)


def slim(tflite: bytes, keep_names: bool = False) -> bytes:
    """``tflite`` with :func:`slim_model` applied, serialized by :func:`write`."""
    model = flatbuffer.read(tflite, "tflite")
    slim_model(model, keep_names)
    return write(model)


def trim_model(model) -> None:
    """Drop quantization parameters no TFLM kernel reads (``micro`` target, TFLM only): the int32 biases' scales
    and zero points (TFLM derives the requantization from the input, weight and output scales) and the
    per-channel zero points of weights when all are 0 (a single 0 remains). ~20 bytes per output channel."""
    for _, graph, op in flatbuffer.weight_ops(model):
        q = graph.tensors[int(op.inputs[1])].quantization
        if q is not None and q.zeroPoint is not None and len(q.zeroPoint) > 1 and not np.any(q.zeroPoint):
            q.zeroPoint = np.zeros(1, dtype=np.int64)
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            bias = graph.tensors[int(op.inputs[2])]
            if bias.type == S.TensorType.INT32:
                bias.quantization = None


trim_for_tflm = flatbuffer.on_bytes(trim_model)


# ----------------------------------------------------------------------------- where the bytes go
def breakdown(tflite: bytes) -> dict:
    """Bytes of the file by part: ``weights`` (weight-op weights as stored: int8/packed data, or the encoded data
    and value tables a ``TFLM_DECODE`` reads; in an Ethos-U file, the constants of the NPU op), ``biases``,
    ``scales`` and ``zero_points`` (quantization vectors),
    ``names`` (tensor, subgraph and signature strings), ``metadata`` (metadata buffers), ``structure`` (the rest:
    tables, offsets, shapes, options, alignment). Shared vectors and buffers are counted once; the parts add up
    to ``file_bytes``."""
    buf = flatbuffer.load(tflite, "breakdown")
    model = flatbuffer.read(buf, "tflite")
    root = S.Model.GetRootAs(buf, 0)
    parts = dict.fromkeys(PARTS, 0)
    counted: set[int] = set()

    def vector(table, field_offset: int, item: int, part: str) -> None:
        _count_vector(table, field_offset, item, part, parts, counted)

    def name_vector(table, field_offset: int) -> None:  # a string: its length, its bytes and a terminating 0
        _count_vector(table, field_offset, 1, "names", parts, counted, extra=1)

    for part, indices in _buffers_by_part(model).items():
        for b in sorted(indices):
            if b < root.BuffersLength():
                vector(root.Buffers(b), 4, 1, part)  # Buffer.data
    for s in range(root.SubgraphsLength()):
        graph = root.Subgraphs(s)
        name_vector(graph, 12)  # SubGraph.name
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            name_vector(tensor, 10)  # Tensor.name
            q = tensor.Quantization()
            if q is not None:
                vector(q, 8, 4, "scales")
                vector(q, 10, 8, "zero_points")
    for i in range(root.SignatureDefsLength()):
        signature = root.SignatureDefs(i)
        name_vector(signature, 8)  # signature_key
        for j in range(signature.InputsLength()):
            name_vector(signature.Inputs(j), 4)
        for j in range(signature.OutputsLength()):
            name_vector(signature.Outputs(j), 4)
    for i in range(root.MetadataLength()):
        name_vector(root.Metadata(i), 4)
    name_vector(root, 10)  # description
    parts["structure"] = len(buf) - sum(parts.values())
    return {"file_bytes": len(buf), **parts}


def _buffers_by_part(model) -> dict:
    """The buffer indices of the ``weights`` (as stored: the weight, or the constants of the ops that compute it;
    in an Ethos-U file the constants of the NPU op), the ``biases`` and the ``metadata``."""
    buffers_of = {"weights": set(), "biases": set()}
    for graph in model.subgraphs:
        producers = {int(o): op for op in graph.operators or [] for o in op.outputs}
        for op in graph.operators or []:
            if flatbuffer.builtin_name(model, op.opcodeIndex) == "ethos-u":  # Vela's command stream and weights
                buffers_of["weights"] |= {int(graph.tensors[int(i)].buffer) for i in op.inputs
                                          if int(i) >= 0 and _has_data(model, graph.tensors[int(i)])}  # fmt: skip
                continue
            if flatbuffer.builtin_name(model, op.opcodeIndex) not in _WEIGHT_OPS or len(op.inputs) < 2:
                continue
            buffers_of["weights"] |= _weight_buffers(model, graph, int(op.inputs[1]), producers)
            if len(op.inputs) > 2 and int(op.inputs[2]) >= 0 and _has_data(model, graph.tensors[int(op.inputs[2])]):
                buffers_of["biases"].add(int(graph.tensors[int(op.inputs[2])].buffer))
    buffers_of["metadata"] = {int(m.buffer) for m in model.metadata or []}
    return buffers_of


def _weight_buffers(model, graph, index: int, producers: dict) -> set[int]:
    """The buffers of weight tensor ``index``: its own, or those of the constants of the ops that compute it (a
    DECODE, a grouped chain)."""
    found, pending, seen = set(), [index], set()
    while pending:
        i = pending.pop()
        if i in seen:
            continue
        seen.add(i)
        if _has_data(model, graph.tensors[i]):
            found.add(int(graph.tensors[i].buffer))
        elif i in producers:
            pending += [int(j) for j in producers[i].inputs if int(j) >= 0]
    return found


def _count_vector(table, field_offset: int, item: int, part: str, parts: dict, counted: set, extra: int = 0) -> None:
    """Add the bytes of the vector in field ``field_offset`` of ``table`` to ``parts[part]``, once per vector."""
    o = table._tab.Offset(field_offset)
    if not o:
        return
    start = table._tab.Vector(o)
    if start in counted:
        return
    counted.add(start)
    parts[part] += 4 + item * table._tab.VectorLen(o) + extra


def _has_data(model, tensor) -> bool:
    data = model.buffers[tensor.buffer].data if 0 < tensor.buffer < len(model.buffers) else None
    return data is not None and len(data) > 0
