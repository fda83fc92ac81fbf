"""A firmware project for one .tflite file: TFLM on a bare-metal Cortex-M, runnable under QEMU.

``firmware(tflite_bytes, out_dir, core=..., inputs=...)`` writes a folder that builds with ``make`` against a
TFLM tree and its ``libtensorflow-microlite.a`` (``firmware_build``) and runs with ``make run``:

* ``<symbol>.cc`` / ``.h``: the model as a 16-byte aligned C array with the measured arena size (``micro.c_array``);
* ``model_ops.h``: ``<symbol>_op_resolver`` (a ``tflite::MicroMutableOpResolver<N>``, N = the model's distinct
  ops) and ``<symbol>_register_ops()``, which adds exactly those ops (``AddDecode()`` for ``TFLM_DECODE``, ...);
* ``ptq_kernels.cc`` / ``.h`` (``ptq_kernels=True``, the default, when the model has an op they replace): small
  int8 kernels for ``TFLM_DECODE`` (LUT-encoded weights) and ``CONCATENATION`` (one quantization), registered
  instead of TFLM's, which instantiate every format and type (about 21 KB and 4.5 KB of Cortex-M4 code, against
  about 1.3 KB and 0.3 KB); each is used only when every op of its kind in the model qualifies;
* ``test_inputs.cc`` / ``.h``: the inputs to run, as the input tensors' bytes;
* ``main.cc``: runs every input, prints each output tensor's bytes and the counters (lines below);
* ``startup.c``, ``link_<core>.ld``: vector table, reset handler and memory map of each supported QEMU board;
* ``Makefile``, ``README.md``.

What ``main.cc`` prints, one fact per line (:func:`parse_output` reads it back)::

    calibration <instructions> <ticks>         a loop of known length timed with SysTick
    ticks <input> <ticks>                      SysTick ticks of one Invoke()
    output <input> <tensor> <hex bytes>        one output tensor after one Invoke()
    op <name> <calls> <ticks>                  per op type, summed over every input (TFLM's profiler hook)
    tflm <text>                                TFLM's own messages (MicroPrintf)
    arena_used <bytes> / arena_size <bytes>
    done

Under ``qemu-system-arm -icount shift=0`` one instruction advances the virtual clock by 1 ns and SysTick counts
the board's core clock, so ticks are instructions divided by a constant that ``calibration`` measures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from . import flatbuffer, micro

__all__ = [
    "ADD_METHODS",
    "CORES",
    "PTQ_KERNELS",
    "FirmwareProject",
    "FirmwareRun",
    "firmware",
    "input_bytes",
    "model_ops",
    "ops_header",
    "parse_output",
    "reference_outputs",
]

S = flatbuffer.schema

# core -> (QEMU machine, linker memory: (flash origin, flash bytes, ram origin, ram bytes))
CORES = {
    "cortex-m4": ("mps2-an386", (0x0, 4 << 20, 0x20000000, 4 << 20)),
    "cortex-m55": ("mps3-an547", (0x0, 512 << 10, 0x20000000, 512 << 10)),
}
KERNELS = ("reference", "cmsis_nn")
# The project's own kernels (firmware_src/ptq_kernels.cc): op -> the model_ops.h lines that register it.
PTQ_KERNELS = {
    "TFLM_DECODE": "  const TFLMRegistration decode = ptq_keras::Register_LUT_DECODE();  // LUT to int8 only\n"
    '  if ((status = resolver.AddCustom("TFLM_DECODE", &decode)) != kTfLiteOk) return status;',
    "CONCATENATION": "  if ((status = resolver.AddConcatenation(ptq_keras::Register_INT8_CONCATENATION())) != "
    "kTfLiteOk) return status;  // int8 only",
}
_PTQ_SOURCES = ("ptq_kernels.cc", "ptq_kernels.h")
# Room added to the arena measured on the Python interpreter: optimized kernels (CMSIS-NN) ask for scratch
# buffers the reference kernels do not. ``arena_used`` on the device shows what was needed.
ARENA_MARGIN = 4096
STACK_BYTES = 16384

# TFLM's MicroMutableOpResolver method for each op a .tflite file names: builtin operators by their schema
# name, custom operators by their custom code.
ADD_METHODS = {
    **{
        name: "Add" + method
        for name, method in {
            "ABS": "Abs",
            "ADD": "Add",
            "ADD_N": "AddN",
            "ARG_MAX": "ArgMax",
            "ARG_MIN": "ArgMin",
            "ASSIGN_VARIABLE": "AssignVariable",
            "AVERAGE_POOL_2D": "AveragePool2D",
            "BATCH_MATMUL": "BatchMatMul",
            "BATCH_TO_SPACE_ND": "BatchToSpaceNd",
            "BROADCAST_ARGS": "BroadcastArgs",
            "BROADCAST_TO": "BroadcastTo",
            "CALL_ONCE": "CallOnce",
            "CAST": "Cast",
            "CEIL": "Ceil",
            "CONCATENATION": "Concatenation",
            "CONV_2D": "Conv2D",
            "COS": "Cos",
            "CUMSUM": "CumSum",
            "DEPTH_TO_SPACE": "DepthToSpace",
            "DEPTHWISE_CONV_2D": "DepthwiseConv2D",
            "DEQUANTIZE": "Dequantize",
            "DIV": "Div",
            "DYNAMIC_UPDATE_SLICE": "DynamicUpdateSlice",
            "EMBEDDING_LOOKUP": "EmbeddingLookup",
            "ELU": "Elu",
            "EQUAL": "Equal",
            "EXP": "Exp",
            "EXPAND_DIMS": "ExpandDims",
            "FILL": "Fill",
            "FLOOR": "Floor",
            "FLOOR_DIV": "FloorDiv",
            "FLOOR_MOD": "FloorMod",
            "FULLY_CONNECTED": "FullyConnected",
            "GATHER": "Gather",
            "GATHER_ND": "GatherNd",
            "GREATER": "Greater",
            "GREATER_EQUAL": "GreaterEqual",
            "HARD_SWISH": "HardSwish",
            "IF": "If",
            "L2_NORMALIZATION": "L2Normalization",
            "L2_POOL_2D": "L2Pool2D",
            "LEAKY_RELU": "LeakyRelu",
            "LESS": "Less",
            "LESS_EQUAL": "LessEqual",
            "LOG": "Log",
            "LOGICAL_AND": "LogicalAnd",
            "LOGICAL_NOT": "LogicalNot",
            "LOGICAL_OR": "LogicalOr",
            "LOGISTIC": "Logistic",
            "LOG_SOFTMAX": "LogSoftmax",
            "MAXIMUM": "Maximum",
            "MAX_POOL_2D": "MaxPool2D",
            "MIRROR_PAD": "MirrorPad",
            "MEAN": "Mean",
            "MINIMUM": "Minimum",
            "MUL": "Mul",
            "NEG": "Neg",
            "NOT_EQUAL": "NotEqual",
            "PACK": "Pack",
            "PAD": "Pad",
            "PADV2": "PadV2",
            "PRELU": "Prelu",
            "QUANTIZE": "Quantize",
            "READ_VARIABLE": "ReadVariable",
            "REDUCE_ALL": "ReduceAll",
            "REDUCE_MAX": "ReduceMax",
            "REDUCE_MIN": "ReduceMin",
            "RELU": "Relu",
            "RELU6": "Relu6",
            "RESHAPE": "Reshape",
            "RESIZE_BILINEAR": "ResizeBilinear",
            "RESIZE_NEAREST_NEIGHBOR": "ResizeNearestNeighbor",
            "REVERSE_V2": "ReverseV2",
            "ROUND": "Round",
            "RSQRT": "Rsqrt",
            "SELECT_V2": "SelectV2",
            "SHAPE": "Shape",
            "SIN": "Sin",
            "SLICE": "Slice",
            "SOFTMAX": "Softmax",
            "SPACE_TO_BATCH_ND": "SpaceToBatchNd",
            "SPACE_TO_DEPTH": "SpaceToDepth",
            "SPLIT": "Split",
            "SPLIT_V": "SplitV",
            "SQUEEZE": "Squeeze",
            "SQRT": "Sqrt",
            "SQUARE": "Square",
            "SQUARED_DIFFERENCE": "SquaredDifference",
            "STRIDED_SLICE": "StridedSlice",
            "SUB": "Sub",
            "SUM": "Sum",
            "SVDF": "Svdf",
            "TANH": "Tanh",
            "TRANSPOSE_CONV": "TransposeConv",
            "TRANSPOSE": "Transpose",
            "UNPACK": "Unpack",
            "UNIDIRECTIONAL_SEQUENCE_LSTM": "UnidirectionalSequenceLSTM",
            "VAR_HANDLE": "VarHandle",
            "WHILE": "While",
            "ZEROS_LIKE": "ZerosLike",
        }.items()
    },
    "TFLM_DECODE": "AddDecode",
    "ethos-u": "AddEthosU",
    "CIRCULAR_BUFFER": "AddCircularBuffer",
    "TFLite_Detection_PostProcess": "AddDetectionPostprocess",
}


def model_ops(tflite: bytes) -> list[str]:
    """The distinct operators of ``tflite`` (every subgraph), in order of first use."""
    model = flatbuffer.read(tflite, "tflite")
    names: list[str] = []
    for graph in model.subgraphs or []:
        for op in graph.operators or []:
            name = flatbuffer.builtin_name(model, op.opcodeIndex)
            if name not in names:
                names.append(name)
    return names


def ptq_kernel_ops(tflite: bytes) -> dict:
    """Which ops of ``tflite`` the project's kernels (``PTQ_KERNELS``) can run: op name -> "" when every op of
    that kind qualifies, else why not (the first one that does not). Ops the model does not use are absent."""
    model = flatbuffer.read(tflite, "tflite")
    why: dict = {}
    for graph in model.subgraphs or []:
        for op in graph.operators or []:
            name = flatbuffer.builtin_name(model, op.opcodeIndex)
            if name not in PTQ_KERNELS:
                continue
            reason = why.get(name) or _ptq_kernel_refuses(model, graph, op, name)
            why[name] = reason
    return why


def _ptq_kernel_refuses(model, graph, op, name: str) -> str:
    tensors = [graph.tensors[int(i)] for i in op.inputs]
    outputs = [graph.tensors[int(o)] for o in op.outputs]
    if any(t.type != S.TensorType.INT8 for t in outputs):
        return f"a {name} output is {flatbuffer.tensor_type_name(outputs[0].type)}, not int8"
    if name == "TFLM_DECODE":
        for ancillary in tensors[1::2]:
            data = flatbuffer.buffer_array(model, ancillary)
            kind = int(data.reshape(-1)[0]) if data is not None and data.size else None
            if kind != 0:
                return f"an encoded tensor has decode type {kind} (0 = LUT; 1 = Huffman, 2 = PRUNE)"
        return ""
    # CONCATENATION: TFLM requires int8 inputs to share the output's scale and zero point (a copy of bytes)
    options = op.builtinOptions
    if options is not None and getattr(options, "fusedActivationFunction", 0) != 0:
        return "a CONCATENATION has a fused activation"

    def quant(t):
        q = t.quantization
        scale = [] if q is None or q.scale is None else [float(v) for v in q.scale]
        zero = [] if q is None or q.zeroPoint is None else [int(v) for v in q.zeroPoint]
        return scale, zero

    if any(t.type != S.TensorType.INT8 or quant(t) != quant(outputs[0]) for t in tensors):
        return "a CONCATENATION input is not int8 with the output's quantization"
    return ""


def _ptq_ops(tflite: bytes, ptq_kernels: bool) -> list[str]:
    """The ops of ``tflite`` that the project's kernels replace (none when ``ptq_kernels`` is False)."""
    if not isinstance(ptq_kernels, bool):
        raise ValueError(f"ptq_kernels must be True or False, got {ptq_kernels!r}.")
    if not ptq_kernels:
        return []
    return [name for name, why in ptq_kernel_ops(tflite).items() if not why]


def ops_header(tflite: bytes, symbol: str = "model_data", ptq_kernels: bool = False) -> str:
    """``model_ops.h``: a resolver type sized for exactly the model's ops and a function that adds them.
    ``ValueError`` naming the op when TFLM's ``MicroMutableOpResolver`` has no method for one. ``ptq_kernels``:
    as :func:`firmware` (the default here registers TFLM's kernels only)."""
    return _ops_header(tflite, symbol, _ptq_ops(tflite, ptq_kernels))


def _ops_header(tflite: bytes, symbol: str, own: list[str]) -> str:
    """:func:`ops_header` with ``own``, the ops registered with the project's kernels, already chosen."""
    _check_symbol(symbol)
    names = model_ops(tflite)
    missing = [n for n in names if n not in ADD_METHODS]
    if missing:
        raise ValueError(
            f"the model uses op(s) {missing} that TFLM's MicroMutableOpResolver cannot register (no Add method): "
            "TFLM cannot run this file. Export a TFLM target (int8, micro, int4) of a model made of supported layers."
        )
    adds = "\n".join(
        PTQ_KERNELS[n]
        if n in own
        else f"  if ((status = resolver.{ADD_METHODS[n]}()) != kTfLiteOk) return status;  // {n}"
        for n in names
    )
    include = '\n#include "ptq_kernels.h"' if own else ""
    return f"""\
// Op resolver for {symbol}: exactly the {len(names)} op(s) the model uses. Generated by ptq_keras.tflite; do not edit.
#pragma once
{include}
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

constexpr unsigned int {symbol}_op_count = {len(names)};
using {symbol}_op_resolver = tflite::MicroMutableOpResolver<{symbol}_op_count>;

// Adds every op of the model to `resolver`; kTfLiteOk, or the first error.
inline TfLiteStatus {symbol}_register_ops({symbol}_op_resolver& resolver) {{
  TfLiteStatus status = kTfLiteOk;
{adds}
  return status;
}}
"""


def _check_symbol(symbol: str) -> None:
    if not isinstance(symbol, str) or not symbol.isidentifier():
        raise ValueError(f"symbol must be a C identifier, got {symbol!r}.")


def _input_tensors(model) -> list:
    graph = model.subgraphs[0]
    return [graph.tensors[int(i)] for i in graph.inputs]


def input_bytes(tflite: bytes, inputs=None) -> list[np.ndarray]:
    """The inputs as one uint8 array ``[n, tensor bytes]`` per input tensor of ``tflite``.

    ``inputs``: one array ``[n, *shape]`` (a one-input model) or a list of them, one per input tensor, already in
    the tensor's type; float arrays for an int8/uint8 tensor are quantized with its scale and zero point. None: one
    input of zero points."""
    model = flatbuffer.read(tflite, "tflite")
    tensors = _input_tensors(model)
    if inputs is None:
        inputs = [np.zeros((1, *[int(d) for d in t.shape][1:]), np.float32) for t in tensors]
    elif not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    if len(inputs) != len(tensors):
        raise ValueError(f"the model has {len(tensors)} input tensor(s); got {len(inputs)} input array(s).")
    out, counts = [], set()
    for k, (tensor, values) in enumerate(zip(tensors, inputs)):
        dtype = np.dtype(flatbuffer._NUMPY_TYPES[tensor.type])
        values = np.asarray(values)
        shape = tuple(int(d) for d in tensor.shape)
        if values.shape[1:] != shape[1:]:
            raise ValueError(
                f"input {k}: expected arrays of shape [n, {', '.join(map(str, shape[1:]))}], got {values.shape}."
            )
        if values.dtype.kind == "f" and dtype.kind in "iu":
            q = tensor.quantization
            scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) else 1.0
            zero = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else 0
            info = np.iinfo(dtype)
            values = np.clip(np.round(values / scale) + zero, info.min, info.max).astype(dtype)
        elif values.dtype != dtype:
            raise ValueError(
                f"input {k}: the tensor is {dtype}, the array {values.dtype}; pass {dtype} (or float to quantize)."
            )
        counts.add(len(values))
        out.append(np.ascontiguousarray(values).reshape(len(values), -1).view(np.uint8))
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every input tensor needs the same, non-zero number of inputs; got {sorted(counts)}.")
    return out


def _inputs_sources(arrays: list[np.ndarray]) -> tuple[str, str]:
    n = len(arrays[0])
    header = [
        "// Inputs the firmware runs, as the bytes of each input tensor. Generated by ptq_keras.tflite; do not edit.",
        "#pragma once",
        "",
        "#include <cstddef>",
        "#include <cstdint>",
        "",
        f"constexpr size_t test_input_count = {n};",
        f"constexpr size_t test_input_tensors = {len(arrays)};",
        "// test_inputs[k] + i * test_input_bytes[k]: input i of input tensor k.",
        "extern const uint8_t* const test_inputs[test_input_tensors];",
        "extern const size_t test_input_bytes[test_input_tensors];",
    ]
    source = ['#include "test_inputs.h"', ""]
    for k, arr in enumerate(arrays):
        source.append(f'__attribute__((section(".test_inputs"), aligned(16))) static const uint8_t input_{k}[] = {{')
        flat = arr.reshape(-1)
        for start in range(0, len(flat), 24):
            source.append("    " + ",".join(str(int(b)) for b in flat[start : start + 24]) + ",")
        source.append("};")
    source.append(f"const uint8_t* const test_inputs[] = {{{', '.join(f'input_{k}' for k in range(len(arrays)))}}};")
    source.append(f"const size_t test_input_bytes[] = {{{', '.join(str(a.shape[1]) for a in arrays)}}};")
    return "\n".join(source) + "\n", "\n".join(header) + "\n"


_MAIN = r"""// Runs {symbol} on every test input with TensorFlow Lite Micro and prints what it computed.
// Generated by ptq_keras.tflite; the line format is read back by ptq_keras.tflite.firmware.parse_output.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "model_ops.h"
#include "{symbol}.h"
#include "tensorflow/lite/micro/cortex_m_generic/debug_log_callback.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_profiler_interface.h"
#include "tensorflow/lite/schema/schema_generated.h"
#include "test_inputs.h"

// SysTick: a 24-bit down counter at the core clock; its interrupt counts the wraps.
#define SYST_CSR (*(volatile uint32_t*)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t*)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t*)0xE000E018u)
static volatile uint32_t systick_wraps = 0;
extern "C" void SysTick_Handler(void) {{ systick_wraps = systick_wraps + 1; }}

static void ticks_start() {{
  SYST_RVR = 0xFFFFFFu;
  SYST_CVR = 0;
  SYST_CSR = 7u;  // enable, interrupt, processor clock
  while (SYST_CVR == 0) {{
  }}  // the first reload: from here on 0xFFFFFF - SYST_CVR counts up
}}

static uint64_t ticks_now() {{
  uint32_t wraps, value;
  do {{
    wraps = systick_wraps;
    value = SYST_CVR;
  }} while (wraps != systick_wraps);
  return (uint64_t)wraps * 0x1000000u + (0xFFFFFFu - value);
}}

// newlib-nano's printf has no 64-bit conversions: 64-bit counters are printed through this.
static const char* u64_text(uint64_t value, char* text) {{
  char digits[21];
  int n = 0;
  do {{
    digits[n++] = (char)('0' + value % 10u);
    value /= 10u;
  }} while (value != 0u);
  for (int i = 0; i < n; ++i) text[i] = digits[n - 1 - i];
  text[n] = '\0';
  return text;
}}

// Two instructions per iteration (subs, bne): a loop of known length for the ticks-to-instructions ratio.
static void spin(uint32_t n) {{ __asm volatile("1: subs %0, %0, #1\n\tbne 1b" : "+r"(n) : : "cc"); }}

namespace {{

// Sums SysTick ticks per op name over every Invoke (TFLM calls it around each op).
class OpTicks : public tflite::MicroProfilerInterface {{
 public:
  uint32_t BeginEvent(const char* tag) override {{
    uint32_t slot = 0;
    while (slot < count_ && std::strcmp(tags_[slot], tag) != 0) ++slot;
    if (slot == count_) {{
      if (count_ == kSlots) return kSlots;
      tags_[count_++] = tag;
    }}
    started_[slot] = ticks_now();
    return slot;
  }}
  void EndEvent(uint32_t slot) override {{
    if (slot >= kSlots) return;
    ticks_[slot] += ticks_now() - started_[slot];
    calls_[slot] += 1;
  }}
  void Print() const {{
    for (uint32_t i = 0; i < count_; ++i) {{
      char text[21];
      std::printf("op %s %lu %s\n", tags_[i], (unsigned long)calls_[i], u64_text(ticks_[i], text));
    }}
  }}

 private:
  static constexpr uint32_t kSlots = 48;
  const char* tags_[kSlots] = {{}};
  uint64_t started_[kSlots] = {{}};
  uint64_t ticks_[kSlots] = {{}};
  uint32_t calls_[kSlots] = {{}};
  uint32_t count_ = 0;
}};

alignas(16) uint8_t tensor_arena[{symbol}_arena_size];

}}  // namespace

// TFLM's own messages (MicroPrintf), one "tflm" line each.
static void print_tflm_log(const char* text) {{ std::printf("tflm %s\n", text); }}

int main() {{
  RegisterDebugLogCallback(print_tflm_log);
  ticks_start();
  uint64_t t0 = ticks_now();
  spin(1000000u);
  char text[21];
  std::printf("calibration 2000000 %s\n", u64_text(ticks_now() - t0, text));

  const tflite::Model* model = tflite::GetModel({symbol});
  if (model->version() != TFLITE_SCHEMA_VERSION) {{
    std::printf("error schema version %lu, TFLM expects %d\n", (unsigned long)model->version(), TFLITE_SCHEMA_VERSION);
    return 2;
  }}
  static {symbol}_op_resolver resolver;
  if ({symbol}_register_ops(resolver) != kTfLiteOk) {{
    std::printf("error registering the model's ops\n");
    return 3;
  }}
  static OpTicks op_ticks;
  static tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, sizeof(tensor_arena), nullptr, &op_ticks);
  if (interpreter.AllocateTensors() != kTfLiteOk) {{
    std::printf("error AllocateTensors failed with a %u-byte arena\n", (unsigned)sizeof(tensor_arena));
    return 4;
  }}
  if (interpreter.inputs_size() != test_input_tensors) {{
    std::printf("error the model has %u inputs, test_inputs.h %u\n", (unsigned)interpreter.inputs_size(),
                (unsigned)test_input_tensors);
    return 5;
  }}
  for (size_t k = 0; k < test_input_tensors; ++k) {{
    if (interpreter.input(k)->bytes != test_input_bytes[k]) {{
      std::printf("error input %u has %u bytes, test_inputs.h %u\n", (unsigned)k,
                  (unsigned)interpreter.input(k)->bytes, (unsigned)test_input_bytes[k]);
      return 5;
    }}
  }}
  for (size_t i = 0; i < test_input_count; ++i) {{
    for (size_t k = 0; k < test_input_tensors; ++k) {{
      std::memcpy(interpreter.input(k)->data.raw, test_inputs[k] + i * test_input_bytes[k], test_input_bytes[k]);
    }}
    uint64_t start = ticks_now();
    TfLiteStatus status = interpreter.Invoke();
    uint64_t ticks = ticks_now() - start;
    if (status != kTfLiteOk) {{
      std::printf("error Invoke failed on input %u\n", (unsigned)i);
      return 6;
    }}
    std::printf("ticks %u %s\n", (unsigned)i, u64_text(ticks, text));
    for (size_t k = 0; k < interpreter.outputs_size(); ++k) {{
      const TfLiteTensor* out = interpreter.output(k);
      std::printf("output %u %u ", (unsigned)i, (unsigned)k);
      for (size_t b = 0; b < out->bytes; ++b) std::printf("%02x", (unsigned)(uint8_t)out->data.raw[b]);
      std::printf("\n");
    }}
  }}
  op_ticks.Print();
  std::printf("arena_used %u\narena_size %u\ndone\n", (unsigned)interpreter.arena_used_bytes(),
              (unsigned)sizeof(tensor_arena));
  return 0;
}}
"""

_STARTUP = r"""/* Bare-metal start-up for a Cortex-M under QEMU with semihosting. Generated by ptq_keras.tflite. */
#include <stdint.h>
#include <stdlib.h>

extern int main(void);
extern void initialise_monitor_handles(void);
extern void __libc_init_array(void);
extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;

void Reset_Handler(void);
void SysTick_Handler(void);
void *__dso_handle = 0;
void _init(void) {}
void _fini(void) {}

/* Any fault or unexpected exception: semihosting SYS_EXIT with a run-time error, so QEMU exits non-zero. */
void Fault_Handler(void) {
  __asm volatile("movs r0, #0x18\n\tldr r1, =0x20023\n\tbkpt 0xab");
  for (;;) {
  }
}

__attribute__((section(".vectors"), used)) void (*const vector_table[16])(void) = {
    (void (*)(void))&_estack, Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler,            0,             0,             0,             0,             Fault_Handler,
    Fault_Handler,            0,             Fault_Handler, SysTick_Handler,
};

void Reset_Handler(void) {
#if defined(__ARM_FP) || defined(__ARM_FEATURE_MVE)
  /* CPACR: full access to CP10/CP11 (FPU and MVE); without it the first such instruction faults. */
  *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
  __asm volatile("dsb\n\tisb");
#endif
  uint32_t *src = &_sidata;
  for (uint32_t *dst = &_sdata; dst < &_edata;) *dst++ = *src++;
  for (uint32_t *dst = &_sbss; dst < &_ebss;) *dst++ = 0;
  initialise_monitor_handles();
  __libc_init_array();
  exit(main());
}
"""

_LINKER = """\
/* Memory map of {machine} ({core}) for the firmware. Generated by ptq_keras.tflite. */
MEMORY
{{
  FLASH (rx) : ORIGIN = 0x{flash:08x}, LENGTH = {flash_len}
  RAM (rwx) : ORIGIN = 0x{ram:08x}, LENGTH = {ram_len}
}}
ENTRY(Reset_Handler)
_estack = ORIGIN(RAM) + LENGTH(RAM);
_stack_bytes = {stack};

SECTIONS
{{
  .text :
  {{
    KEEP(*(.vectors))
    *(.text*)
    *(.rodata*)
    KEEP(*(.init))
    KEEP(*(.fini))
    . = ALIGN(4);
  }} > FLASH
  .test_inputs : {{ KEEP(*(.test_inputs)) . = ALIGN(4); }} > FLASH
  .ARM.extab : {{ *(.ARM.extab* .gnu.linkonce.armextab.*) }} > FLASH
  .ARM.exidx : {{ __exidx_start = .; *(.ARM.exidx* .gnu.linkonce.armexidx.*) __exidx_end = .; }} > FLASH
  .eh_frame : {{ KEEP(*(.eh_frame)) }} > FLASH
  .preinit_array :
  {{
    PROVIDE_HIDDEN(__preinit_array_start = .);
    KEEP(*(.preinit_array*))
    PROVIDE_HIDDEN(__preinit_array_end = .);
  }} > FLASH
  .init_array :
  {{
    PROVIDE_HIDDEN(__init_array_start = .);
    KEEP(*(SORT(.init_array.*)))
    KEEP(*(.init_array*))
    PROVIDE_HIDDEN(__init_array_end = .);
  }} > FLASH
  .fini_array :
  {{
    PROVIDE_HIDDEN(__fini_array_start = .);
    KEEP(*(SORT(.fini_array.*)))
    KEEP(*(.fini_array*))
    PROVIDE_HIDDEN(__fini_array_end = .);
  }} > FLASH
  _sidata = LOADADDR(.data);
  .data : ALIGN(4)
  {{
    _sdata = .;
    *(.data*)
    . = ALIGN(4);
    _edata = .;
  }} > RAM AT> FLASH
  .bss (NOLOAD) : ALIGN(4)
  {{
    _sbss = .;
    *(.bss*)
    *(COMMON)
    . = ALIGN(4);
    _ebss = .;
  }} > RAM
  end = .;
  _end = .;
  __end__ = .;
  ASSERT(_ebss + _stack_bytes <= _estack, "RAM overflow: .data + .bss leave less than the stack needs")
}}
"""

_MAKEFILE = """\
# Firmware for {symbol}: TensorFlow Lite Micro on a bare-metal Cortex-M, run under QEMU. Generated by ptq_keras.tflite.
#
#   make TFLM_ROOT=<tflite-micro tree> [CORE=cortex-m4|cortex-m55] [KERNELS=cmsis_nn|reference]   # build
#   make run ...                                                                            # build and run
#
# TFLM_LIB is TFLM's libtensorflow-microlite.a for that core and kernels (TFLM's own Makefile puts it under
# gen/ in the tree); flags.mk beside it holds the compile flags the library was built with (README.md).
CORE ?= {core}
KERNELS ?= {kernels}
TFLM_ROOT ?= {tflm_root}
TOOLCHAIN_PREFIX ?= arm-none-eabi-
QEMU ?= qemu-system-arm
QEMU_TIMEOUT ?= 900

MACHINE_cortex-m4 := mps2-an386
MACHINE_cortex-m55 := mps3-an547
MACHINE := $(MACHINE_$(CORE))
ifeq ($(MACHINE),)
$(error CORE=$(CORE) is not supported: choose cortex-m4 or cortex-m55)
endif
ifeq ($(KERNELS),reference)
TFLM_GEN := $(TFLM_ROOT)/gen/cortex_m_generic_$(CORE)_default_gcc
else
TFLM_GEN := $(TFLM_ROOT)/gen/cortex_m_generic_$(CORE)_default_$(KERNELS)_gcc
endif
TFLM_LIB ?= $(TFLM_GEN)/lib/libtensorflow-microlite.a
TFLM_FLAGS ?= $(dir $(TFLM_LIB))flags.mk

ifeq ($(filter clean,$(MAKECMDGOALS)),)
ifeq ($(TFLM_ROOT),)
$(error TFLM_ROOT is not set: pass TFLM_ROOT=<tflite-micro tree> (README.md))
endif
ifeq ($(wildcard $(TFLM_FLAGS)),)
$(error $(TFLM_FLAGS) not found: build TFLM for $(CORE) ($(KERNELS)) first, \\
  e.g. `python -m ptq_keras.tflite.firmware_build` (see README.md))
endif
include $(TFLM_FLAGS)
endif

CXX := $(TOOLCHAIN_PREFIX)g++
CC := $(TOOLCHAIN_PREFIX)gcc
SIZE := $(TOOLCHAIN_PREFIX)size
CPU_FLAGS := $(filter -mcpu=% -mfloat-abi=% -mfpu=% -mthumb,$(TFLM_CXXFLAGS))
BUILD := build/$(CORE)_$(KERNELS)
ELF := $(BUILD)/firmware.elf
SOURCES := main.cc {symbol}.cc test_inputs.cc{extra_sources}
OBJECTS := $(SOURCES:%.cc=$(BUILD)/%.o) $(BUILD)/startup.o

.PHONY: all run size clean
all: $(ELF)

$(BUILD)/%.o: %.cc {symbol}.h model_ops.h test_inputs.h{extra_headers} $(TFLM_FLAGS)
\t@mkdir -p $(BUILD)
\t$(CXX) $(TFLM_CXXFLAGS) -I. -c $< -o $@

$(BUILD)/startup.o: startup.c
\t@mkdir -p $(BUILD)
\t$(CC) $(CPU_FLAGS) -Os -c $< -o $@

$(ELF): $(OBJECTS) $(TFLM_LIB) link_$(CORE).ld
\t$(CXX) $(CPU_FLAGS) -nostartfiles --specs=nano.specs --specs=rdimon.specs -T link_$(CORE).ld -Wl,--gc-sections \\
\t\t-Wl,-Map=$(BUILD)/firmware.map $(OBJECTS) $(TFLM_LIB) -lm -o $@
\t$(SIZE) $@

size: $(ELF)
\t$(SIZE) -A $<

# -icount shift=0: one instruction per ns of virtual time, so SysTick counts instructions (main.cc).
run: $(ELF)
\ttimeout $(QEMU_TIMEOUT) $(QEMU) -M $(MACHINE) -nographic -monitor none -semihosting-config enable=on,target=native \\
\t\t-icount shift=0 -kernel $<

clean:
\trm -rf build
"""

_README = """\
# Firmware for `{symbol}` ({n_ops} TFLM ops)

Generated by ptq_keras.tflite from a {size:,}-byte .tflite file. It runs the model with TensorFlow Lite Micro on
{n_inputs} embedded test input(s) and prints every output tensor's bytes, the arena used and the instructions per
inference.

| file | what |
|---|---|
| `{symbol}.cc`, `{symbol}.h` | the model, a 16-byte aligned C array; `{symbol}_arena_size` ({arena:,} B) |
| `model_ops.h` | `{symbol}_op_resolver` and `{symbol}_register_ops()`: exactly the model's ops ({ops}) |{ptq_row}
| `test_inputs.cc`, `test_inputs.h` | the inputs run by `main.cc` |
| `main.cc` | the test program (output lines: `output <input> <tensor> <hex>`, `ticks`, `op`, `arena_used`) |
| `startup.c`, `link_*.ld` | start-up code; memory maps of QEMU's `mps2-an386` (M4) and `mps3-an547` (M55) |
| `Makefile` | builds against a TFLM tree and its `libtensorflow-microlite.a`; `make run` runs under QEMU |

## Run it as is (QEMU)

Needs `arm-none-eabi-gcc` (with newlib and libstdc++) and `qemu-system-arm`, and TFLM built for the core, with
the `flags.mk` the ptq_keras library builder writes beside the library:

    python -m ptq_keras.tflite.firmware_build          # or, in the ptq_keras repository, `make firmware`
    make run TFLM_ROOT=<tflite-micro tree> CORE=cortex-m4 KERNELS=cmsis_nn

`CORE=cortex-m55` runs on `mps3-an547` (Helium/MVE kernels); `KERNELS=reference` links TFLM's reference kernels.

## Use it in your own project (a real board)

Copy `{symbol}.cc`, `{symbol}.h` and `model_ops.h`{ptq_copy} into the project that
already builds TFLM for your board, then:

```cpp
#include "{symbol}.h"
#include "model_ops.h"
#include "tensorflow/lite/micro/micro_interpreter.h"

alignas(16) static uint8_t tensor_arena[{symbol}_arena_size];
static {symbol}_op_resolver resolver;

// in your set-up code:
{symbol}_register_ops(resolver);  // returns kTfLiteOk
static tflite::MicroInterpreter interpreter(tflite::GetModel({symbol}), resolver, tensor_arena,
                                            sizeof(tensor_arena));
interpreter.AllocateTensors();
// fill interpreter.input(0)->data.int8, interpreter.Invoke(), read interpreter.output(0)->data.int8
```

The arena size was measured on TFLM's reference kernels plus {margin} B for optimized kernels' scratch buffers;
`interpreter.arena_used_bytes()` on the board gives the exact need. Your startup code, linker script and TFLM
build replace `startup.c`, `link_*.ld` and the `Makefile`.
"""


@dataclass
class FirmwareProject:
    """What :func:`firmware` wrote: the folder, its files, the ops registered and the arena."""

    out_dir: str
    files: list
    ops: list
    arena_bytes: int
    inputs: int
    ptq_ops: list = field(default_factory=list)  # ops registered with ptq_kernels.cc instead of TFLM's kernels


def firmware(
    tflite_bytes: bytes,
    out_dir: str | os.PathLike,
    *,
    core: str = "cortex-m4",
    kernels: str = "cmsis_nn",
    inputs=None,
    symbol: str = "model_data",
    arena_bytes: int | None = None,
    tflm_root: str | os.PathLike | None = None,
    ptq_kernels: bool = True,
) -> FirmwareProject:
    """Write the firmware project of ``tflite_bytes`` into ``out_dir`` (see the module docstring).

    ``core``: the Makefile's default core (both cores' linker scripts are written); ``kernels``: its default
    TFLM kernels. ``inputs``: as :func:`input_bytes`. ``arena_bytes``: the tensor arena; default: measured on
    the TFLM Python interpreter plus ``ARENA_MARGIN``. ``tflm_root``: the Makefile's default ``TFLM_ROOT``.
    ``ptq_kernels``: register the project's small int8 kernels (``PTQ_KERNELS``, written as ``ptq_kernels.cc``)
    for ``TFLM_DECODE`` and ``CONCATENATION`` where every such op of the model qualifies (LUT-encoded int8
    weights; int8 inputs sharing one quantization), instead of TFLM's, which link code for every format and type;
    False: TFLM's kernels only. Outputs are the same bit for bit either way.
    The folder is built next to ``out_dir`` and renamed into place: a reader never sees it half-written.
    """
    _check_project_options(core, kernels, symbol)
    tflite_bytes = bytes(tflite_bytes)
    own = _ptq_ops(tflite_bytes, ptq_kernels)
    header = _ops_header(tflite_bytes, symbol, own)  # the unsupported-op error before any slow step
    arrays = input_bytes(tflite_bytes, inputs)
    if arena_bytes is None:
        arena_bytes = micro.measure_arena(tflite_bytes) + ARENA_MARGIN
    arena_bytes = int(arena_bytes)
    if arena_bytes <= 0:
        raise ValueError(f"arena_bytes must be positive, got {arena_bytes}.")
    source, model_header = micro.c_array(tflite_bytes, symbol, arena_bytes=arena_bytes)
    inputs_source, inputs_header = _inputs_sources(arrays)
    ops = model_ops(tflite_bytes)
    files = {
        f"{symbol}.cc": source,
        f"{symbol}.h": model_header,
        "model_ops.h": header,
        "test_inputs.cc": inputs_source,
        "test_inputs.h": inputs_header,
        "main.cc": _MAIN.format(symbol=symbol),
        "startup.c": _STARTUP,
        "Makefile": _makefile(symbol, core, kernels, tflm_root, own),
        "README.md": _readme(symbol, ops, len(tflite_bytes), len(arrays[0]), arena_bytes, own),
    }
    if own:
        files.update(_ptq_sources())
    files.update(_linker_scripts())
    _write_folder(os.fspath(out_dir), files)
    return FirmwareProject(os.fspath(out_dir), sorted(files), ops, arena_bytes, len(arrays[0]), own)


def _check_project_options(core: str, kernels: str, symbol: str) -> None:
    if core not in CORES:
        raise ValueError(f"core {core!r} is not supported; choose from {sorted(CORES)}.")
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r} unknown; choose from {list(KERNELS)}.")
    _check_symbol(symbol)


def _makefile(symbol: str, core: str, kernels: str, tflm_root, own: list) -> str:
    return _MAKEFILE.format(
        symbol=symbol,
        core=core,
        kernels=kernels,
        tflm_root=os.fspath(tflm_root) if tflm_root else "",
        extra_sources=" ptq_kernels.cc" if own else "",
        extra_headers=" ptq_kernels.h" if own else "",
    )


def _readme(symbol: str, ops: list, size: int, n_inputs: int, arena_bytes: int, own: list) -> str:
    return _README.format(
        symbol=symbol,
        n_ops=len(ops),
        ops=", ".join(ops),
        size=size,
        n_inputs=n_inputs,
        arena=arena_bytes,
        margin=ARENA_MARGIN,
        ptq_row=(
            f"\n| `ptq_kernels.cc`, `ptq_kernels.h` | small int8 kernels registered instead of TFLM's for "
            f"{', '.join(own)} (TFLM's link code for every format and type) |"
            if own
            else ""
        ),
        ptq_copy=" (and `ptq_kernels.cc`, `ptq_kernels.h`)" if own else "",
    )


def _linker_scripts() -> dict:
    """``link_<core>.ld`` of every supported core."""
    return {
        f"link_{name}.ld": _LINKER.format(
            machine=machine, core=name, flash=flash, flash_len=flash_len, ram=ram, ram_len=ram_len, stack=STACK_BYTES
        )
        for name, (machine, (flash, flash_len, ram, ram_len)) in CORES.items()
    }


def _ptq_sources() -> dict:
    """The project's kernels' source files (shipped with the package in ``firmware_src/``)."""
    import importlib.resources

    folder = importlib.resources.files(__package__) / "firmware_src"
    return {name: (folder / name).read_text() for name in _PTQ_SOURCES}


def _write_folder(out_dir: str, files: dict) -> None:
    """Write ``files`` (name -> text) as the folder ``out_dir``: into a temporary folder beside it, then
    renamed into place (an existing folder is replaced only once the new one is complete)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_firmware_", dir=parent)
    old = None
    try:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        os.chmod(tmp, 0o755)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".old_firmware_", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(out_dir):
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def reference_outputs(tflite: bytes, inputs=None) -> list[np.ndarray]:
    """What the TFLM Python interpreter computes on ``inputs`` (as :func:`input_bytes`): one uint8 array
    ``[n, tensor bytes]`` per output tensor, the bytes the firmware prints."""
    arrays = input_bytes(tflite, inputs)
    it = micro.interpreter(bytes(tflite))
    details = [it.get_input_details(k) for k in range(len(arrays))]
    n_outputs = len(flatbuffer.read(tflite, "tflite").subgraphs[0].outputs)
    rows: list[list[bytes]] = []
    for i in range(len(arrays[0])):
        for k, (arr, d) in enumerate(zip(arrays, details)):
            it.set_input(arr[i].view(d["dtype"]).reshape(d["shape"]), k)
        it.invoke()
        rows.append([np.ascontiguousarray(it.get_output(k)).tobytes() for k in range(n_outputs)])
    return [np.frombuffer(b"".join(r[k] for r in rows), np.uint8).reshape(len(rows), -1) for k in range(n_outputs)]


@dataclass
class FirmwareRun:
    """What one run of the firmware printed (:func:`parse_output`)."""

    outputs: dict = field(default_factory=dict)  # (input, tensor) -> bytes
    ticks: list = field(default_factory=list)  # per input
    ops: dict = field(default_factory=dict)  # op name -> (calls, ticks)
    calibration: tuple = (0, 0)  # (instructions, ticks)
    arena_used: int | None = None
    arena_size: int | None = None
    done: bool = False
    errors: list = field(default_factory=list)
    log: list = field(default_factory=list)  # TFLM's own messages

    @property
    def instructions_per_tick(self) -> float:
        instructions, ticks = self.calibration
        if not ticks:
            raise ValueError("the run printed no calibration line.")
        return instructions / ticks

    def instructions(self) -> list[float]:
        """Instructions per inference, one per input."""
        return [t * self.instructions_per_tick for t in self.ticks]

    def output_array(self, tensor: int = 0) -> np.ndarray:
        """Output ``tensor`` of every input as uint8 rows ``[n, bytes]``."""
        rows = [self.outputs[(i, tensor)] for i in range(len(self.ticks))]
        return np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), -1)


def parse_output(text: str) -> FirmwareRun:
    """Read back what ``main.cc`` printed (lines of other forms are ignored)."""
    run = FirmwareRun()
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        key = parts[0]
        if key == "output" and len(parts) in (3, 4):
            run.outputs[(int(parts[1]), int(parts[2]))] = bytes.fromhex(parts[3] if len(parts) == 4 else "")
        elif key == "ticks" and len(parts) == 3:
            run.ticks.append(int(parts[2]))
        elif key == "op" and len(parts) == 4:
            run.ops[parts[1]] = (int(parts[2]), int(parts[3]))
        elif key == "calibration" and len(parts) == 3:
            run.calibration = (int(parts[1]), int(parts[2]))
        elif key in ("arena_used", "arena_size") and len(parts) == 2:
            setattr(run, key, int(parts[1]))
        elif key == "done":
            run.done = True
        elif key == "error":
            run.errors.append(line)
        elif key == "tflm":
            run.log.append(line[5:])
    return run
