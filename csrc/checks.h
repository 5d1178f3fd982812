// Argument checks shared by the CPU and CUDA implementations. Public Python functions validate their
// inputs first (with messages that name the argument); these TORCH_CHECKs are the last line of
// defence for direct calls of torch.ops.tfp_kernels.*.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define TFP_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define TFP_CHECK_CUDA(x) TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define TFP_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define TFP_CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must be ", d, "-D, got shape ", (x).sizes())
#define TFP_CHECK_DTYPE(x, t) \
  TORCH_CHECK((x).scalar_type() == (t), #x " must have dtype ", t, ", got ", (x).scalar_type())
