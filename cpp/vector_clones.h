// OS_VECTOR_CLONES: compile a hot vectorised CPU loop three times on x86-64,
// for AVX-512 (16 floats a vector), AVX2 (8) and the baseline (SSE2, 4); the
// loader picks one for the running CPU (GCC/Clang function multiversioning,
// an ifunc), as torch picks its own kernels. Lanes are IEEE-exact and
// -ffp-contract=off keeps FMAs out, so every clone gives the same bits.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define OS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define OS_VECTOR_CLONES
#endif
