// The kernels compiled with AVX2 + FMA + F16C enabled for this file only; prefix_attention.cpp calls
// them only when the CPU reports all three. All standard headers are included (through
// kernel_common.h) before the target pragma, so no inline library code is built for AVX2 here.
#include <new>

#include "kernel_common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define PK_ISA avx2
#define PK_VEC_BYTES 32
#define PK_F16C 1
#include "kernel_impl.h"
#pragma GCC pop_options
#else
// Not x86-64 GCC: build the portable kernels under the avx2 name (never selected).
#define PK_ISA avx2
#include "kernel_impl.h"
#endif
