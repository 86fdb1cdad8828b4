// The portable variant of the soft top-k hot loops: the compiler's baseline target (SSE2 on
// x86-64), 16-byte vectors, no FMA. Always compiled; the fallback on any CPU.
#define SOFTSAE_ISA_NS isa_portable
#define SOFTSAE_ISA_NAME "portable"
#define SOFTSAE_VEC_BYTES 16
#define SOFTSAE_ISA_LEVEL 0
#include "soft_topk_simd.inc"

namespace softsae {
namespace cpu {
const SoftTopkIsa* soft_topk_isa_portable() { return &isa_portable::kIsa; }
}  // namespace cpu
}  // namespace softsae
