// The kernel registry of the emulated device (fake_cuda.cpp): each kernels/*.cu file, rewritten
// for emu.h and wrapped in its own namespace, registers its entry points by name, and
// cuLaunchKernel unpacks the driver's `void** kernelParams` into the entry point's own parameter
// types (deduced from the function pointer, so nothing here repeats a kernel's signature).
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

#include "emu.h"

using fake_cuda_launcher = void (*)(dim3e grid, unsigned threads, void** params);
extern "C" void fake_cuda_register(const char* name, fake_cuda_launcher launch);

template <class... A, std::size_t... I>
void fake_cuda_call(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cvref_t<A>*>(p[I])...);
}
template <class... A>
void fake_cuda_call(void (*f)(A...), void** p) {
    fake_cuda_call(f, p, std::index_sequence_for<A...>{});
}

#define FAKE_CUDA_KERNEL(ns, name)                                                             \
    static const bool fake_cuda_reg_##name = (fake_cuda_register(#name,                        \
                                                                 [](dim3e g, unsigned t, void** p) { \
                                                                     launch(g, t, [p] { fake_cuda_call(&ns::name, p); }); \
                                                                 }),                           \
                                              true);
