// Small TFLM kernels for the files ptq_keras writes (ptq_kernels.cc says what each accepts). Part of ptq_keras.
#pragma once

#include "tensorflow/lite/micro/micro_common.h"

namespace ptq_keras {

// TFLM_DECODE for LUT-encoded int8 tensors; add it under TFLM's custom op name:
//   const TFLMRegistration decode = ptq_keras::Register_LUT_DECODE();
//   resolver.AddCustom("TFLM_DECODE", &decode);  // the resolver copies the registration
TFLMRegistration Register_LUT_DECODE();

// CONCATENATION of int8 tensors that share the output's quantization:
//   resolver.AddConcatenation(ptq_keras::Register_INT8_CONCATENATION());
TFLMRegistration Register_INT8_CONCATENATION();

}  // namespace ptq_keras
