// Minimal CUDA shim: lets the NVRTC sources in dali_rehearsal/kernels/*.cu compile as plain
// C++ so that their kernels can be emulated on the CPU (see driver.cpp).
//
// Valid only for kernels without shared memory or block synchronisation,
// whose threads are therefore independent and may run one after another.
#pragma once

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) alignas(n)

struct dr_shim_dim3 {
    unsigned int x, y, z;
};

// Launch coordinates of the emulated thread, set by the driver.
extern thread_local dr_shim_dim3 gridDim;
extern thread_local dr_shim_dim3 blockDim;
extern thread_local dr_shim_dim3 blockIdx;
extern thread_local dr_shim_dim3 threadIdx;
