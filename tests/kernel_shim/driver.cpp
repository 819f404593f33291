// CPU driver for dali_rehearsal/kernels/movement.cu compiled through cuda_shim.h.
//
// Build (from the repository root):
//   g++ -O1 -shared -fPIC -std=c++14 -I dali_rehearsal/kernels
//       tests/kernel_shim/driver.cpp -o movement_shim.so
//
// Every exported function is named shim_<kernel entry point> and takes the
// grid (x, y, z) and block (x) dimensions followed by the kernel arguments;
// it runs every thread of every block sequentially, calling the very
// ``extern "C"`` entry point that NVRTC compiles for the GPU.

#include "cuda_shim.h"
#include "movement.cu"

thread_local dr_shim_dim3 gridDim;
thread_local dr_shim_dim3 blockDim;
thread_local dr_shim_dim3 blockIdx;
thread_local dr_shim_dim3 threadIdx;

namespace {

// Runs body() once per thread of a (grid_x, grid_y, grid_z) x (block_x) launch.
template <typename Body>
void launch(unsigned int grid_x, unsigned int grid_y, unsigned int grid_z,
            unsigned int block_x, Body body) {
    gridDim = {grid_x, grid_y, grid_z};
    blockDim = {block_x, 1, 1};
    for (unsigned int bz = 0; bz < grid_z; ++bz) {
        for (unsigned int by = 0; by < grid_y; ++by) {
            for (unsigned int bx = 0; bx < grid_x; ++bx) {
                for (unsigned int tx = 0; tx < block_x; ++tx) {
                    blockIdx = {bx, by, bz};
                    threadIdx = {tx, 0, 0};
                    body();
                }
            }
        }
    }
}

}  // namespace

#define DR_SHIM_EXPORT(W, N)                                                     \
    extern "C" void shim_copy_rows_w##N(                                         \
        unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,      \
        const void* src, void* dst, long long n_rows, long long row_words,       \
        long long offset) {                                                      \
        launch(gx, gy, gz, bx, [&] {                                             \
            copy_rows_w##N(static_cast<const W*>(src), static_cast<W*>(dst),     \
                           n_rows, row_words, offset);                           \
        });                                                                      \
    }                                                                            \
    extern "C" void shim_gather_rows_w##N(                                       \
        unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,      \
        const void* src, const long long* index, void* dst, long long n_rows,    \
        long long row_words, long long offset) {                                 \
        launch(gx, gy, gz, bx, [&] {                                             \
            gather_rows_w##N(static_cast<const W*>(src), index,                  \
                             static_cast<W*>(dst), n_rows, row_words, offset);   \
        });                                                                      \
    }                                                                            \
    extern "C" void shim_scatter_rows_w##N(                                      \
        unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,      \
        const void* src, const long long* src_index, void* dst,                  \
        const long long* dst_index, long long n_rows, long long row_words) {     \
        launch(gx, gy, gz, bx, [&] {                                             \
            scatter_rows_w##N(static_cast<const W*>(src), src_index,             \
                              static_cast<W*>(dst), dst_index, n_rows,           \
                              row_words);                                        \
        });                                                                      \
    }

DR_SHIM_EXPORT(unsigned char, 1)
DR_SHIM_EXPORT(unsigned short, 2)
DR_SHIM_EXPORT(unsigned int, 4)
DR_SHIM_EXPORT(unsigned long long, 8)
DR_SHIM_EXPORT(dr_word16, 16)

extern "C" void shim_copy_fields(unsigned int gx, unsigned int gy, unsigned int gz,
                                 unsigned int bx, const void* fields, long long n_rows,
                                 long long offset) {
    launch(gx, gy, gz, bx, [&] {
        copy_fields(static_cast<const dr_field*>(fields), n_rows, offset);
    });
}

extern "C" void shim_gather_fields(unsigned int gx, unsigned int gy, unsigned int gz,
                                   unsigned int bx, const void* fields,
                                   const long long* index, long long n_rows,
                                   long long offset) {
    launch(gx, gy, gz, bx, [&] {
        gather_fields(static_cast<const dr_field*>(fields), index, n_rows, offset);
    });
}

extern "C" void shim_scatter_fields(unsigned int gx, unsigned int gy, unsigned int gz,
                                    unsigned int bx, const void* fields,
                                    const long long* src_index,
                                    const long long* dst_index, long long n_rows) {
    launch(gx, gy, gz, bx, [&] {
        scatter_fields(static_cast<const dr_field*>(fields), src_index, dst_index, n_rows);
    });
}
