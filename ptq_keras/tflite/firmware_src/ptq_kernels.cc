// Two small TFLM kernels for the files ptq_keras writes, registered in place of TFLM's own (ptq_kernels.h).
//
// TFLM_DECODE, LUT-encoded int8 only. TFLM's DECODE kernel (tensorflow/lite/micro/kernels/decode.cc) decodes LUT,
// Huffman and PRUNE tensors into bool, float and 8- to 64-bit integer outputs; a firmware links all of it (about
// 21 KB of Cortex-M4 code) even when the model only holds LUT-encoded int8 weights, which is what ptq_keras writes
// for ternary layers by default. This kernel reads the same format for that one case, under the same custom op
// name, so the .tflite file is unchanged. Format: the ancillary tensor's byte 0 is the decode type (0 = LUT),
// byte 1 the header version (1), byte 4 the LUT version (1), byte 5's low 3 bits the index bit width (1..7),
// byte 6 the value-table stride (entries per channel; 0 = one table for every channel), value tables from byte 16.
// The encoded tensor holds the indices, most significant bit first, in the output's memory order. The channel
// axis and count come from the output's per-channel quantization (axis 0 or the last axis), as in TFLM's kernel.
//
// CONCATENATION, int8 only. TFLM's kernel instantiates its copy loop for six types (about 4.5 KB); int8 inputs
// must share the output's scale and zero point in TFLM, so the op is a copy of bytes, done here with memcpy.
// ptq_keras' max_decode_bytes split joins the parts of a split layer with it.
//
// Anything else fails at Prepare with a message: register TFLM's kernel (AddDecode(), AddConcatenation()).
// Generated into firmware projects by ptq_keras.tflite.firmware; part of ptq_keras (Apache-2.0).

#include "ptq_kernels.h"

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "tensorflow/lite/c/builtin_op_data.h"
#include "tensorflow/lite/c/common.h"
#include "tensorflow/lite/kernels/kernel_util.h"
#include "tensorflow/lite/micro/kernels/kernel_util.h"
#include "tensorflow/lite/micro/micro_arena_constants.h"
#include "tensorflow/lite/micro/micro_context.h"
#include "tensorflow/lite/micro/micro_log.h"

namespace ptq_keras {
namespace {

constexpr size_t kHeaderBytes = 16;
constexpr uint8_t kTypeLut = 0;

// What Eval needs for one encoded tensor; pointers into the flatbuffer are read again in Eval.
struct LutTensor {
  uint32_t count;        // elements of the output
  uint32_t channels;     // output channels of the per-channel quantization (1 without one)
  uint32_t per_channel;  // consecutive elements per channel (channel axis 0); 0: channel = element % channels
  uint32_t entries;      // value-table entries in the ancillary tensor
  uint8_t stride;        // value-table entries per channel; 0: one shared table
  uint8_t bits;          // index bit width
};

// `bytes` bytes of 2-bit indices to 4 * `bytes` outputs, two indices per lookup in `pairs`. A function of its own:
// few live values, so -Os keeps them in registers.
__attribute__((noinline)) void DecodePairs(const uint8_t* in, const uint16_t* pairs, uint32_t* out, uint32_t bytes) {
  const uint8_t* end = in + (bytes & ~3u);
  while (in != end) {  // four input bytes per 32-bit load
    uint32_t word;
    memcpy(&word, in, 4);
    in += 4;
    out[0] = pairs[(word >> 4) & 15] | (static_cast<uint32_t>(pairs[word & 15]) << 16);
    out[1] = pairs[(word >> 12) & 15] | (static_cast<uint32_t>(pairs[(word >> 8) & 15]) << 16);
    out[2] = pairs[(word >> 20) & 15] | (static_cast<uint32_t>(pairs[(word >> 16) & 15]) << 16);
    out[3] = pairs[word >> 28] | (static_cast<uint32_t>(pairs[(word >> 24) & 15]) << 16);
    out += 4;
  }
  for (uint32_t k = 0; k < (bytes & 3u); ++k) {
    const uint32_t b = in[k];
    out[k] = pairs[b >> 4] | (static_cast<uint32_t>(pairs[b & 15]) << 16);
  }
}

// Indices MSB first from element `first` on (at a byte boundary), a table of `stride` entries per channel (stride
// 0: one table for every channel).
void DecodeAny(const uint8_t* in, const int8_t* tables, int8_t* out, const LutTensor& t, uint32_t first) {
  const uint32_t mask = (1u << t.bits) - 1;
  uint32_t acc = 0;
  unsigned have = 0;
  in += first * t.bits / 8;
  for (uint32_t i = first; i < t.count; ++i) {
    if (have < t.bits) {
      acc = (acc << 8) | *in++;
      have += 8;
    }
    have -= t.bits;
    const uint32_t channel = t.per_channel ? i / t.per_channel : i % t.channels;
    out[i] = tables[channel * t.stride + ((acc >> have) & mask)];
  }
}

// Why this kernel cannot decode the tensor triple, or nullptr; fills `t`.
const char* SetUp(const TfLiteTensor& input, const TfLiteTensor& ancillary, const TfLiteTensor& output,
                  LutTensor* t) {
  const uint8_t* header = tflite::GetTensorData<uint8_t>(&ancillary);
  if (!tflite::IsConstantTensor(&input) || !tflite::IsConstantTensor(&ancillary)) return "inputs not constant";
  if (ancillary.bytes < kHeaderBytes || header[0] != kTypeLut || header[1] != 1 || header[4] != 1 ||
      output.type != kTfLiteInt8) {
    return "not LUT v1 to int8 (register AddDecode())";
  }
  t->bits = header[5] & 0x07;
  t->stride = header[6];
  t->count = static_cast<uint32_t>(tflite::NumElements(&output));
  t->channels = 1;
  t->per_channel = t->count;
  if (output.quantization.type == kTfLiteAffineQuantization && output.quantization.params != nullptr) {
    const auto* q = static_cast<const TfLiteAffineQuantization*>(output.quantization.params);
    t->channels = static_cast<uint32_t>(q->scale->size);
    if (t->channels > 1 && q->quantized_dimension == output.dims->size - 1) {
      t->per_channel = 0;
    } else if (q->quantized_dimension == 0) {
      t->per_channel = t->count / t->channels;
    } else {
      return "channel axis neither first nor last";
    }
  }
  t->entries = static_cast<uint32_t>(ancillary.bytes - kHeaderBytes);
  const uint32_t tables = t->stride == 0 ? 1 : t->channels * t->stride;
  if (t->bits == 0 || t->entries < tables || input.bytes < (static_cast<size_t>(t->count) * t->bits + 7) / 8) {
    return "indices or tables too short";
  }
  return nullptr;
}

TfLiteStatus DecodePrepare(TfLiteContext* context, TfLiteNode* node) {
  const size_t outputs = tflite::NumOutputs(node);
  tflite::MicroContext* micro_context = tflite::GetMicroContext(context);
  auto* state = static_cast<LutTensor*>(micro_context->AllocatePersistentBuffer(outputs * sizeof(LutTensor)));
  node->user_data = state;
  const char* why = outputs == 0 || tflite::NumInputs(node) != 2 * outputs || state == nullptr ? "inputs" : nullptr;
  // Decoded tensors of this op may go to memory the application set aside with SetDecompressionMemory(), as
  // with TFLM's kernel; otherwise the memory planner places them in the arena.
  micro_context->ResetDecompressionMemoryAllocations();
  for (size_t i = 0; i < outputs && why == nullptr; ++i) {
    TfLiteTensor* input = micro_context->AllocateTempInputTensor(node, 2 * i);
    TfLiteTensor* ancillary = micro_context->AllocateTempInputTensor(node, 2 * i + 1);
    TfLiteTensor* output = micro_context->AllocateTempOutputTensor(node, i);
    if (input == nullptr || ancillary == nullptr || output == nullptr) {
      why = "inputs";
    } else {
      why = SetUp(*input, *ancillary, *output, &state[i]);
    }
    if (why == nullptr && output->data.data == nullptr) {
      void* memory = micro_context->AllocateDecompressionMemory(output->bytes, tflite::MicroArenaBufferAlignment());
      if (memory != nullptr) {
        tflite::micro::GetEvalOutput(context, node, i)->data.data = memory;
        output->data.data = memory;
      }
    }
    if (input != nullptr) micro_context->DeallocateTempTfLiteTensor(input);
    if (ancillary != nullptr) micro_context->DeallocateTempTfLiteTensor(ancillary);
    if (output != nullptr) micro_context->DeallocateTempTfLiteTensor(output);
  }
  if (why != nullptr) {
    MicroPrintf("ptq_keras LUT decode: %s", why);
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus DecodeEval(TfLiteContext* context, TfLiteNode* node) {
  const auto* state = static_cast<const LutTensor*>(node->user_data);
  for (size_t i = 0; i < tflite::NumOutputs(node); ++i) {
    const uint8_t* in = tflite::micro::GetTensorData<uint8_t>(tflite::micro::GetEvalInput(context, node, 2 * i));
    const int8_t* tables =
        tflite::micro::GetTensorData<int8_t>(tflite::micro::GetEvalInput(context, node, 2 * i + 1)) + kHeaderBytes;
    int8_t* out = tflite::micro::GetTensorData<int8_t>(tflite::micro::GetEvalOutput(context, node, i));
    const LutTensor& t = state[i];
    uint32_t first = 0;
    if (t.bits == 2 && (t.stride == 0 || t.channels == 1) && (reinterpret_cast<uintptr_t>(out) & 3) == 0) {
      // Ternary weights, four 2-bit indices per byte: each nibble (two indices) maps to two output bytes
      // through a 16-entry table, the first index (the high bits) to the lower address; entries past the value
      // table read as 0.
      uint16_t pairs[16];
      for (unsigned k = 0; k < 16; ++k) {
        const uint32_t lo = (k >> 2) < t.entries ? static_cast<uint8_t>(tables[k >> 2]) : 0;
        const uint32_t hi = (k & 3) < t.entries ? static_cast<uint8_t>(tables[k & 3]) : 0;
        pairs[k] = static_cast<uint16_t>(lo | (hi << 8));
      }
      DecodePairs(in, pairs, reinterpret_cast<uint32_t*>(out), t.count / 4);
      first = t.count / 4 * 4;
    }
    DecodeAny(in, tables, out, t, first);
  }
  return kTfLiteOk;
}

// CONCATENATION of int8 tensors sharing one quantization: for each of `rows[0]` rows (the product of the output
// dimensions before the axis), each input's row in turn; rows[1 + i] = bytes of input i's row (its dimensions from
// the axis on).

TfLiteStatus ConcatPrepare(TfLiteContext* context, TfLiteNode* node) {
  const size_t inputs = tflite::NumInputs(node);
  tflite::MicroContext* micro_context = tflite::GetMicroContext(context);
  const auto* params = static_cast<const TfLiteConcatenationParams*>(node->builtin_data);
  auto* rows = static_cast<uint32_t*>(micro_context->AllocatePersistentBuffer(4 * (inputs + 1)));
  node->user_data = rows;
  TfLiteTensor* output = micro_context->AllocateTempOutputTensor(node, 0);
  bool ok = rows != nullptr && output != nullptr && params != nullptr && params->activation == kTfLiteActNone &&
            output->type == kTfLiteInt8 && inputs > 0;
  const int axis = ok ? (params->axis < 0 ? params->axis + output->dims->size : params->axis) : 0;
  ok = ok && axis >= 0 && axis < output->dims->size;
  if (ok) {
    rows[0] = 1;
    for (int d = 0; d < axis; ++d) rows[0] *= output->dims->data[d];
  }
  for (size_t i = 0; i < inputs && ok; ++i) {
    TfLiteTensor* input = micro_context->AllocateTempInputTensor(node, i);
    ok = input != nullptr && input->type == kTfLiteInt8 && input->params.scale == output->params.scale &&
         input->params.zero_point == output->params.zero_point && input->dims->size == output->dims->size;
    if (ok) {
      rows[1 + i] = 1;
      for (int d = axis; d < input->dims->size; ++d) rows[1 + i] *= input->dims->data[d];
    }
    if (input != nullptr) micro_context->DeallocateTempTfLiteTensor(input);
  }
  if (ok) {  // the rows fill the output exactly: Eval writes no byte past it
    uint32_t row = 0;
    for (size_t i = 0; i < inputs; ++i) row += rows[1 + i];
    ok = static_cast<int64_t>(rows[0]) * row == tflite::NumElements(output);
  }
  if (output != nullptr) micro_context->DeallocateTempTfLiteTensor(output);
  if (!ok) {
    MicroPrintf("ptq_keras CONCATENATION: int8 with one quantization only (register AddConcatenation())");
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus ConcatEval(TfLiteContext* context, TfLiteNode* node) {
  const auto* rows = static_cast<const uint32_t*>(node->user_data);
  const size_t inputs = tflite::NumInputs(node);
  int8_t* out = tflite::micro::GetTensorData<int8_t>(tflite::micro::GetEvalOutput(context, node, 0));
  for (uint32_t row = 0; row < rows[0]; ++row) {
    for (size_t i = 0; i < inputs; ++i) {
      const uint32_t n = rows[1 + i];
      memcpy(out, tflite::micro::GetTensorData<int8_t>(tflite::micro::GetEvalInput(context, node, i)) + row * n, n);
      out += n;
    }
  }
  return kTfLiteOk;
}

}  // namespace

TFLMRegistration Register_LUT_DECODE() { return tflite::micro::RegisterOp(nullptr, DecodePrepare, DecodeEval); }

TFLMRegistration Register_INT8_CONCATENATION() {
  return tflite::micro::RegisterOp(nullptr, ConcatPrepare, ConcatEval);
}

}  // namespace ptq_keras
