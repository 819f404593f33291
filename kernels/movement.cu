// Row-movement kernels for the rehearsal buffer.
//
// A "row" is one sample: the bytes of a C-contiguous array below its first
// axis.  Rows are moved as arrays of ``row_words`` words of type W, where W is
// chosen by the host so that its size divides the row byte count and every
// base pointer (see kernels/__init__.py: word_type_for).  The kernels are
// therefore dtype-agnostic.
//
// Launch layout: rows run on blockIdx.y (grid-stride, gridDim.y <= 65535),
// words within a row on x (grid-stride over blockIdx.x * blockDim.x).  There
// is no shared memory and no block-level synchronisation, so every thread is
// independent; tests/kernel_shim relies on this to emulate the kernels
// exactly on the CPU.
//
// This file must stay NVRTC-compatible: no #include, no std types.
// Instantiations are requested by the host through name expressions such as
// "gather_rows<unsigned int>".

struct __align__(16) dr_word16 {
    unsigned long long lo;
    unsigned long long hi;
};

// Copies one row of ``row_words`` words; the x dimension of the grid strides
// over the words.
template <typename W>
__device__ __forceinline__ void dr_copy_row(const W* __restrict__ src_row,
                                            W* __restrict__ dst_row,
                                            long long row_words) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x;
         w < row_words; w += stride) {
        dst_row[w] = src_row[w];
    }
}

// dst[dst_row_offset + k] = src[k] for k in [0, n_rows).
template <typename W>
__global__ void copy_rows(const W* __restrict__ src, W* __restrict__ dst,
                          long long n_rows, long long row_words,
                          long long dst_row_offset) {
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        dr_copy_row(src + row * row_words,
                    dst + (dst_row_offset + row) * row_words, row_words);
    }
}

// dst[dst_row_offset + k] = src[index[k]] for k in [0, n_rows).
template <typename W>
__global__ void gather_rows(const W* __restrict__ src,
                            const long long* __restrict__ index,
                            W* __restrict__ dst, long long n_rows,
                            long long row_words, long long dst_row_offset) {
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        dr_copy_row(src + index[row] * row_words,
                    dst + (dst_row_offset + row) * row_words, row_words);
    }
}

// dst[dst_index[k]] = src[src_index[k]] for k in [0, n_rows).
// dst_index must not repeat (the winner of a repeated write is unspecified).
template <typename W>
__global__ void scatter_rows(const W* __restrict__ src,
                             const long long* __restrict__ src_index,
                             W* __restrict__ dst,
                             const long long* __restrict__ dst_index,
                             long long n_rows, long long row_words) {
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        dr_copy_row(src + src_index[row] * row_words,
                    dst + dst_index[row] * row_words, row_words);
    }
}
