// Vector math shared by the CPU kernels: SLEEF's exp, log and sincos (1.0 ULP) as libtorch_cpu exports them, and
// the widest instruction set a kernel may use on this machine. The extension is built for the baseline x86-64
// (no -march), so each kernel compiles its vector path under a target attribute and picks it at run time.
#pragma once
#include <ATen/Version.h>

#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define GENFAST_CPU_X86 1
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// Declared weak so that a torch built without SLEEF still loads this library; the scalar paths run then.
// The layout of SLEEF's Sleef___m256_2 as sincos returns it: sines first, then cosines.
struct SleefFloat8x2 {
  __m256 sin, cos;
};
extern "C" {
__m256 Sleef_expf8_u10avx2(__m256) __attribute__((weak));
__m256 Sleef_logf8_u10avx2(__m256) __attribute__((weak));
SleefFloat8x2 Sleef_sincosf8_u10avx2(__m256) __attribute__((weak));
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f")
// Their 16-lane AVX-512F twins (Sleef___m512_2 likewise holds sines, then cosines).
struct SleefFloat16x2 {
  __m512 sin, cos;
};
extern "C" {
__m512 Sleef_logf16_u10avx512f(__m512) __attribute__((weak));
SleefFloat16x2 Sleef_sincosf16_u10avx512f(__m512) __attribute__((weak));
}
#pragma GCC pop_options
#endif

namespace genfast::cpu {

enum class Isa { kScalar, kAvx2, kAvx512 };

// The widest path this CPU, this torch's SLEEF and torch's own CPU capability allow. The last one honours
// ATEN_CPU_CAPABILITY (default / avx2 / avx512), which is how the tests reach every path.
inline Isa simd_isa() {
#ifdef GENFAST_CPU_X86
  static const Isa isa = [] {
    const std::string capability = at::get_cpu_capability();
    const bool avx2 = capability != "DEFAULT" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      Sleef_expf8_u10avx2 != nullptr && Sleef_logf8_u10avx2 != nullptr &&
                      Sleef_sincosf8_u10avx2 != nullptr;
    if (avx2 && capability == "AVX512" && __builtin_cpu_supports("avx512f") && Sleef_logf16_u10avx512f != nullptr &&
        Sleef_sincosf16_u10avx512f != nullptr) {
      return Isa::kAvx512;
    }
    return avx2 ? Isa::kAvx2 : Isa::kScalar;
  }();
  return isa;
#else
  return Isa::kScalar;
#endif
}

}  // namespace genfast::cpu
