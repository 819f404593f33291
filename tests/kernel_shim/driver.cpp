// CPU driver for kernels/movement.cu compiled through cuda_shim.h.
//
// Build (from the repository root):
//   g++ -O1 -shared -fPIC -std=c++14 -I kernels
//       tests/kernel_shim/driver.cpp -o movement_shim.so
//
// Every exported function is named <kernel>_<word size in bytes> and takes the
// grid (x, y) and block (x) dimensions followed by the kernel arguments; it
// runs every thread of every block sequentially.

#include "cuda_shim.h"
#include "movement.cu"

thread_local dr_shim_dim3 gridDim;
thread_local dr_shim_dim3 blockDim;
thread_local dr_shim_dim3 blockIdx;
thread_local dr_shim_dim3 threadIdx;

namespace {

// Runs body() once per thread of a (grid_x, grid_y) x (block_x) launch.
template <typename Body>
void launch(unsigned int grid_x, unsigned int grid_y, unsigned int block_x,
            Body body) {
    gridDim = {grid_x, grid_y, 1};
    blockDim = {block_x, 1, 1};
    for (unsigned int by = 0; by < grid_y; ++by) {
        for (unsigned int bx = 0; bx < grid_x; ++bx) {
            for (unsigned int tx = 0; tx < block_x; ++tx) {
                blockIdx = {bx, by, 0};
                threadIdx = {tx, 0, 0};
                body();
            }
        }
    }
}

}  // namespace

#define DR_SHIM_EXPORT(W, SIZE)                                               \
    extern "C" void copy_rows_##SIZE(                                         \
        unsigned int gx, unsigned int gy, unsigned int bx, const void* src,   \
        void* dst, long long n_rows, long long row_words, long long offset) { \
        launch(gx, gy, bx, [&] {                                              \
            copy_rows<W>(static_cast<const W*>(src), static_cast<W*>(dst),    \
                         n_rows, row_words, offset);                          \
        });                                                                   \
    }                                                                         \
    extern "C" void gather_rows_##SIZE(                                       \
        unsigned int gx, unsigned int gy, unsigned int bx, const void* src,   \
        const long long* index, void* dst, long long n_rows,                  \
        long long row_words, long long offset) {                              \
        launch(gx, gy, bx, [&] {                                              \
            gather_rows<W>(static_cast<const W*>(src), index,                 \
                           static_cast<W*>(dst), n_rows, row_words, offset);  \
        });                                                                   \
    }                                                                         \
    extern "C" void scatter_rows_##SIZE(                                      \
        unsigned int gx, unsigned int gy, unsigned int bx, const void* src,   \
        const long long* src_index, void* dst, const long long* dst_index,    \
        long long n_rows, long long row_words) {                              \
        launch(gx, gy, bx, [&] {                                              \
            scatter_rows<W>(static_cast<const W*>(src), src_index,            \
                            static_cast<W*>(dst), dst_index, n_rows,          \
                            row_words);                                       \
        });                                                                   \
    }

DR_SHIM_EXPORT(unsigned char, 1)
DR_SHIM_EXPORT(unsigned short, 2)
DR_SHIM_EXPORT(unsigned int, 4)
DR_SHIM_EXPORT(unsigned long long, 8)
DR_SHIM_EXPORT(dr_word16, 16)
