// Row-movement kernels for the rehearsal buffer.
//
// A "row" is one sample: the bytes of a C-contiguous array below its first
// axis.  Rows are moved as arrays of ``row_words`` words of type W, where W is
// chosen by the host so that its size divides the row byte count and every
// base pointer (see __init__.py: word_type_for).  The kernels are
// therefore dtype-agnostic.
//
// Two families, every entry point ``extern "C"`` (plain symbol names, so that
// the host compiles the module without NVRTC name expressions and CuPy's
// on-disk kernel cache serves every later process):
//
// * single-field kernels ``copy_rows_wN``, ``gather_rows_wN``,
//   ``scatter_rows_wN`` (N = word size in bytes: 1, 2, 4, 8, 16): one array;
// * multi-field kernels ``copy_fields``, ``gather_fields``,
//   ``scatter_fields``: every field of a step in one launch.  A descriptor
//   table in device memory (one ``dr_field`` per field: source and
//   destination base, row length in words, word size) is indexed by
//   blockIdx.z; the word size is uniform within a block, so the switch on it
//   does not diverge.
//
// Launch layout: rows run on blockIdx.y (grid-stride, gridDim.y <= 65535),
// words within a row on x (grid-stride over blockIdx.x * blockDim.x), fields
// on z.  There is no shared memory and no block-level synchronisation, so
// every thread is independent; tests/kernel_shim relies on this to run the
// kernels exactly on the CPU.
//
// This file must stay NVRTC-compatible: no #include, no std types.

struct __align__(16) dr_word16 {
    unsigned long long lo;
    unsigned long long hi;
};

// One field of a multi-field movement (32 bytes; the host packs the same
// layout: movement.py, FIELD_DTYPE).
struct dr_field {
    const char* src;         // first byte of source row 0
    char* dst;               // first byte of destination row 0
    long long row_words;     // words per row
    long long word_bytes;    // 1, 2, 4, 8 or 16
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

template <typename W>
__device__ __forceinline__ void dr_move_row_as(const dr_field& f, long long src_row,
                                               long long dst_row) {
    dr_copy_row(reinterpret_cast<const W*>(f.src) + src_row * f.row_words,
                reinterpret_cast<W*>(f.dst) + dst_row * f.row_words, f.row_words);
}

// Moves row ``src_row`` of field ``f`` to its row ``dst_row``.
__device__ __forceinline__ void dr_move_row(const dr_field& f, long long src_row,
                                            long long dst_row) {
    switch (f.word_bytes) {
        case 16: dr_move_row_as<dr_word16>(f, src_row, dst_row); break;
        case 8: dr_move_row_as<unsigned long long>(f, src_row, dst_row); break;
        case 4: dr_move_row_as<unsigned int>(f, src_row, dst_row); break;
        case 2: dr_move_row_as<unsigned short>(f, src_row, dst_row); break;
        default: dr_move_row_as<unsigned char>(f, src_row, dst_row); break;
    }
}

// ------------------------------------------------------------ single field

// dst[dst_row_offset + k] = src[k] for k in [0, n_rows).
template <typename W>
__device__ __forceinline__ void dr_copy_rows(const W* __restrict__ src, W* __restrict__ dst,
                                             long long n_rows, long long row_words,
                                             long long dst_row_offset) {
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        dr_copy_row(src + row * row_words,
                    dst + (dst_row_offset + row) * row_words, row_words);
    }
}

// dst[dst_row_offset + k] = src[index[k]] for k in [0, n_rows).
template <typename W>
__device__ __forceinline__ void dr_gather_rows(const W* __restrict__ src,
                                               const long long* __restrict__ index,
                                               W* __restrict__ dst, long long n_rows,
                                               long long row_words,
                                               long long dst_row_offset) {
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        dr_copy_row(src + index[row] * row_words,
                    dst + (dst_row_offset + row) * row_words, row_words);
    }
}

// dst[dst_index[k]] = src[src_index[k]] for k in [0, n_rows).
// dst_index must not repeat (the winner of a repeated write is unspecified).
template <typename W>
__device__ __forceinline__ void dr_scatter_rows(const W* __restrict__ src,
                                                const long long* __restrict__ src_index,
                                                W* __restrict__ dst,
                                                const long long* __restrict__ dst_index,
                                                long long n_rows, long long row_words) {
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        dr_copy_row(src + src_index[row] * row_words,
                    dst + dst_index[row] * row_words, row_words);
    }
}

#define DR_SINGLE_FIELD_KERNELS(W, N)                                              \
    extern "C" __global__ void copy_rows_w##N(const W* __restrict__ src,           \
                                              W* __restrict__ dst, long long n_rows,   \
                                              long long row_words,                 \
                                              long long dst_row_offset) {          \
        dr_copy_rows<W>(src, dst, n_rows, row_words, dst_row_offset);              \
    }                                                                              \
    extern "C" __global__ void gather_rows_w##N(                                   \
        const W* __restrict__ src, const long long* __restrict__ index,            \
        W* __restrict__ dst, long long n_rows, long long row_words,                \
        long long dst_row_offset) {                                                \
        dr_gather_rows<W>(src, index, dst, n_rows, row_words, dst_row_offset);     \
    }                                                                              \
    extern "C" __global__ void scatter_rows_w##N(                                  \
        const W* __restrict__ src, const long long* __restrict__ src_index,        \
        W* __restrict__ dst, const long long* __restrict__ dst_index,              \
        long long n_rows, long long row_words) {                                   \
        dr_scatter_rows<W>(src, src_index, dst, dst_index, n_rows, row_words);     \
    }

DR_SINGLE_FIELD_KERNELS(dr_word16, 16)
DR_SINGLE_FIELD_KERNELS(unsigned long long, 8)
DR_SINGLE_FIELD_KERNELS(unsigned int, 4)
DR_SINGLE_FIELD_KERNELS(unsigned short, 2)
DR_SINGLE_FIELD_KERNELS(unsigned char, 1)

// ------------------------------------------------------------- all fields

// For every field f = fields[z]: f.dst[dst_row_offset + k] = f.src[k].
extern "C" __global__ void copy_fields(const dr_field* __restrict__ fields,
                                       long long n_rows, long long dst_row_offset) {
    const dr_field f = fields[blockIdx.z];
    if ((long long)blockIdx.x * blockDim.x >= f.row_words) return;   // a shorter field
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        dr_move_row(f, row, dst_row_offset + row);
    }
}

// For every field f: f.dst[dst_row_offset + k] = f.src[index[k]].
extern "C" __global__ void gather_fields(const dr_field* __restrict__ fields,
                                         const long long* __restrict__ index,
                                         long long n_rows, long long dst_row_offset) {
    const dr_field f = fields[blockIdx.z];
    if ((long long)blockIdx.x * blockDim.x >= f.row_words) return;
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        dr_move_row(f, index[row], dst_row_offset + row);
    }
}

// For every field f: f.dst[dst_index[k]] = f.src[src_index[k]]
// (dst_index must not repeat).
extern "C" __global__ void scatter_fields(const dr_field* __restrict__ fields,
                                          const long long* __restrict__ src_index,
                                          const long long* __restrict__ dst_index,
                                          long long n_rows) {
    const dr_field f = fields[blockIdx.z];
    if ((long long)blockIdx.x * blockDim.x >= f.row_words) return;
    for (long long row = blockIdx.y; row < n_rows; row += gridDim.y) {
        dr_move_row(f, src_index[row], dst_index[row]);
    }
}
