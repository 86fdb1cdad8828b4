// The AVX-512 variant of the soft top-k hot loops (F, DQ, BW, VL + FMA; 64-byte vectors). Only
// this file's code is compiled for that target, by a pragma rather than -mavx512f (setup.py and
// CMake keep one portable set of flags); soft_topk.cpp calls it only after CPUID says the CPU and OS support it.
// GCC only: elsewhere (or off x86-64) the variant is absent and soft_topk_isa_avx512() is nullptr.
#include "soft_topk_isa.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
// Standard headers first, for the baseline target: only the code below is built for AVX-512.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define SOFTSAE_ISA_NS isa_avx512
#define SOFTSAE_ISA_NAME "avx512"
#define SOFTSAE_VEC_BYTES 64
#define SOFTSAE_ISA_LEVEL 2
#include "soft_topk_simd.inc"
#pragma GCC pop_options

namespace softsae {
namespace cpu {
const SoftTopkIsa* soft_topk_isa_avx512() { return &isa_avx512::kIsa; }
}  // namespace cpu
}  // namespace softsae

#else

namespace softsae {
namespace cpu {
const SoftTopkIsa* soft_topk_isa_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace softsae

#endif
