// OS_VECTOR_CLONES: compile a hot vectorised CPU loop three times on x86-64,
// for AVX-512 (16 floats a vector), AVX2 (8) and the baseline (SSE2, 4); the
// loader picks one for the running CPU (GCC/Clang function multiversioning,
// an ELF ifunc, so glibc only), as torch picks its own kernels. Lanes are
// IEEE-exact and -ffp-contract=off keeps FMAs out (AVX-512 and AVX2 have
// them), so every clone gives the same bits (gtest VectorClones.*). Only on
// class-template members and plain functions: Clang rejects it on function
// templates.
#pragma once

#include <cstddef>  // defines __GLIBC__ where glibc is the C library

#if defined(__has_attribute)
#if __has_attribute(target_clones) && defined(__x86_64__) && defined(__ELF__) && \
    defined(__GLIBC__) && !defined(__CUDACC__)
#define OS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef OS_VECTOR_CLONES
#define OS_VECTOR_CLONES
#endif

// For the loops inside a cloned function: inlined, they are compiled for
// each clone's instruction set (a call would run one baseline copy).
#if defined(__GNUC__) || defined(__clang__)
#define OS_ALWAYS_INLINE __attribute__((always_inline))
#else
#define OS_ALWAYS_INLINE
#endif
