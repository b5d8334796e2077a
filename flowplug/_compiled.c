/*
 * flowplug._compiled: compiled inner loops of flowplug's readers and writers, and the
 * convolutions of the coupling networks.
 *
 * Optional: pip builds it when a C compiler is present; flowplug.compiled falls back to
 * numpy (same results up to the last bit of a deviation) when it is missing. No numpy
 * headers: arrays arrive through the buffer protocol. Every function checks its
 * arguments against the buffers it was given (no access outside them) and releases the
 * GIL while it works, so that flowplug.linkcheck.map_pieces runs pieces on several
 * cores at once.
 *
 * Functions (see flowplug/compiled.py for the Python-level contract):
 *   swap_copy(src, dst, word, swap) -> bool     copy (byte swapping each word), all finite?
 *   sun_deviation(values, n) -> (unit, det)     max |U U^+ - 1|, max |det U - 1|, N = 2, 3
 *   xor_sites(data, acc, site_bytes, first)     the SciDAC checksum's reduction of sites by rank
 *   copy_blocks(packed, placed, offsets, ...)   blocks between a packed buffer and placed positions
 *   crc32(data, value=0, word=0)                zlib's CRC-32 (PCLMULQDQ folding where the CPU has it),
 *                                               and with word = 4, 8 whether every float word is finite
 *   conv_gather(...), conv_weight_grad(...)     a network's gathered convolution and its gradients
 *                                               (x86-64 with AVX2 and FMA; tensors by address, checked
 *                                               by flowplug/compiled.py, row indices checked here)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Raised when the compiled module and flowplug/compiled.py disagree (a stale build). */
#define COMPILED_ABI 4

/* x86-64: an AVX2 copy of the hot loops next to the baseline one, chosen when the module
 * loads (the baseline's SSE2 has no byte shuffle, so its swaps run a word at a time) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__) && defined(__linux__)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

static inline uint32_t bswap32(uint32_t x) { return __builtin_bswap32(x); }
static inline uint64_t bswap64(uint64_t x) { return __builtin_bswap64(x); }

/* ---------------------------------------------------------------- swap_copy */

/* count words of type T from src to dst, byte swapped when `swap`; whether none has all its
 * exponent bits set (EXP_SHIFT, EXP_MASK: the exponent field of the float of that size) */
#define SWAP_COPY(NAME, T, BSWAP, EXP_SHIFT, EXP_MASK)                                                     \
    HOT static int NAME(const unsigned char *src, unsigned char *dst, Py_ssize_t count, int swap)          \
    {                                                                                                      \
        T bad = 0;                                                                                         \
        for (Py_ssize_t i = 0; i < count; i++) {                                                           \
            T v;                                                                                           \
            memcpy(&v, src + sizeof(T) * i, sizeof(T));                                                    \
            if (swap)                                                                                      \
                v = BSWAP(v);                                                                              \
            memcpy(dst + sizeof(T) * i, &v, sizeof(T));                                                    \
            bad |= (T)(((v >> EXP_SHIFT) & EXP_MASK) == EXP_MASK);                                         \
        }                                                                                                  \
        return bad == 0;                                                                                   \
    }

SWAP_COPY(swap_copy64, uint64_t, bswap64, 52, 0x7ffu)
SWAP_COPY(swap_copy32, uint32_t, bswap32, 23, 0xffu)

static PyObject *k_swap_copy(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    int word, swap;
    if (!PyArg_ParseTuple(args, "y*w*ip", &src, &dst, &word, &swap))
        return NULL;
    PyObject *result = NULL;
    if (word != 4 && word != 8) {
        PyErr_Format(PyExc_ValueError, "swap_copy: word must be 4 or 8 bytes, found %d", word);
    } else if (src.len != dst.len || src.len % word) {
        PyErr_Format(PyExc_ValueError, "swap_copy: %zd source and %zd destination bytes (equal, a multiple of %d expected)",
                     src.len, dst.len, word);
    } else {
        int finite;
        Py_BEGIN_ALLOW_THREADS
        if (word == 8)
            finite = swap_copy64(src.buf, dst.buf, src.len / 8, swap);
        else
            finite = swap_copy32(src.buf, dst.buf, src.len / 4, swap);
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(finite);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

/* ------------------------------------------------------------- copy_blocks */

/* Block i (of `unit` bytes) of group t lies at i * unit + t * pstride of the packed buffer and
 * at offsets[i] + t * ostride of the placed one; `gather` copies packed -> placed, else
 * placed -> packed. Loop order: i outer, t inner, so that with ostride == unit the placed side
 * is written in runs of `count` consecutive blocks. One function per common unit, so that the
 * copies are inlined moves. On x86-64 a gather of 16-byte aligned blocks writes with
 * non-temporal (streaming) stores: the placed side is a new array much larger than the cache,
 * which then is not read for ownership first (2.5x faster than numpy's strided copy for a
 * 16^4 SU(3) configuration, against 1.2x with plain stores). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <emmintrin.h>
#define STREAM16(d, s) _mm_stream_si128((__m128i *)(d), _mm_loadu_si128((const __m128i *)(s)))
#define STREAM_FENCE() _mm_sfence()
#define STREAMS 1
#else
#define STREAM16(d, s) memcpy((d), (s), 16)
#define STREAM_FENCE() ((void)0)
#define STREAMS 0
#endif

#define COPY_BLOCKS(NAME, UNIT)                                                                            \
    HOT static void NAME(unsigned char *packed, unsigned char *placed, const int64_t *offsets, Py_ssize_t n,  \
                         Py_ssize_t unit, Py_ssize_t count, Py_ssize_t pstride, Py_ssize_t ostride, int gather) \
    {                                                                                                      \
        (void)unit;                                                                                        \
        int stream = STREAMS && gather && (UNIT) % 16 == 0 && (uintptr_t)placed % 16 == 0 && ostride % 16 == 0; \
        for (Py_ssize_t i = 0; i < n; i++) {                                                               \
            unsigned char *p = packed + i * (UNIT);                                                        \
            unsigned char *o = placed + offsets[i];                                                        \
            if (stream && offsets[i] % 16 == 0)                                                            \
                for (Py_ssize_t t = 0; t < count; t++)                                                     \
                    for (Py_ssize_t k = 0; k < (UNIT); k += 16)                                            \
                        STREAM16(o + t * ostride + k, p + t * pstride + k);                                \
            else if (gather)                                                                               \
                for (Py_ssize_t t = 0; t < count; t++)                                                     \
                    memcpy(o + t * ostride, p + t * pstride, (UNIT));                                      \
            else                                                                                           \
                for (Py_ssize_t t = 0; t < count; t++)                                                     \
                    memcpy(p + t * pstride, o + t * ostride, (UNIT));                                      \
        }                                                                                                  \
        if (stream)                                                                                        \
            STREAM_FENCE();                                                                                \
    }

COPY_BLOCKS(copy_blocks144, 144)
COPY_BLOCKS(copy_blocks72, 72)
COPY_BLOCKS(copy_blocks64, 64)
COPY_BLOCKS(copy_blocks32, 32)
COPY_BLOCKS(copy_blocks_any, unit)

static PyObject *k_copy_blocks(PyObject *self, PyObject *args)
{
    PyObject *packed_obj, *placed_obj;
    Py_buffer packed, placed, offsets;
    Py_ssize_t unit, count, pstride, ostride;
    int gather;
    if (!PyArg_ParseTuple(args, "OOy*nnnnp", &packed_obj, &placed_obj, &offsets, &unit, &count, &pstride, &ostride,
                          &gather))
        return NULL;
    /* only the side written to must be writable: a gather reads `packed`, a scatter `placed` */
    if (PyObject_GetBuffer(packed_obj, &packed, gather ? PyBUF_SIMPLE : PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&offsets);
        return NULL;
    }
    if (PyObject_GetBuffer(placed_obj, &placed, gather ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&packed);
        PyBuffer_Release(&offsets);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = offsets.len / (Py_ssize_t)sizeof(int64_t);
    const int64_t *off = offsets.buf;
    /* every block of both sides inside its buffer, checked (without overflow) before anything
     * is copied: span = (count - 1) * stride + unit bytes from a block's first group to its last */
    Py_ssize_t span_o = 0, span_p = 0, last = 0;
    int bad = unit <= 0 || count < 0 || pstride < 0 || ostride < 0 || offsets.len % (Py_ssize_t)sizeof(int64_t) ||
              ((uintptr_t)offsets.buf) % sizeof(int64_t);
    if (!bad && n > 0 && count > 0)
        bad = __builtin_mul_overflow(count - 1, ostride, &span_o) || __builtin_add_overflow(span_o, unit, &span_o) ||
              __builtin_mul_overflow(count - 1, pstride, &span_p) || __builtin_add_overflow(span_p, unit, &span_p) ||
              __builtin_mul_overflow(n - 1, unit, &last) || __builtin_add_overflow(last, span_p, &last) ||
              last > packed.len || span_o > placed.len;
    for (Py_ssize_t i = 0; !bad && count > 0 && i < n; i++)
        bad = off[i] < 0 || off[i] > placed.len - span_o;
    if (bad) {
        PyErr_Format(PyExc_ValueError,
                     "copy_blocks: %zd offsets of blocks of %zd bytes, %zd per group (strides %zd packed, %zd placed) "
                     "do not fit %zd packed and %zd placed bytes (or an offset is negative or misaligned)",
                     n, unit, count, pstride, ostride, packed.len, placed.len);
    } else {
        unsigned char *pk = packed.buf, *pl = placed.buf;
        Py_BEGIN_ALLOW_THREADS
        switch (unit) {
        case 144: copy_blocks144(pk, pl, off, n, unit, count, pstride, ostride, gather); break;
        case 72: copy_blocks72(pk, pl, off, n, unit, count, pstride, ostride, gather); break;
        case 64: copy_blocks64(pk, pl, off, n, unit, count, pstride, ostride, gather); break;
        case 32: copy_blocks32(pk, pl, off, n, unit, count, pstride, ostride, gather); break;
        default: copy_blocks_any(pk, pl, off, n, unit, count, pstride, ostride, gather);
        }
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&packed);
    PyBuffer_Release(&placed);
    PyBuffer_Release(&offsets);
    return result;
}

/* ------------------------------------------------------------ sun_deviation */

/*
 * Per matrix U (row-major complex128, re/im interleaved): the diagonal of U U^+ is the
 * squared row norms n_i = sum_k |U_ik|^2, its off-diagonal entries g_ij = sum_k U_ik
 * conj(U_jk); det U by expansion along row 0. Returned: max over matrices of
 * max(|n_i - 1|, |g_ij|) and of |det U - 1|. Moduli are taken as sqrt of the largest
 * squared modulus (one square root per call). A NaN never wins a comparison, so a NaN
 * term counts as 0 and the matrix's other terms still count (flowplug rejects NaN before).
 */
/* SU(3): blocks of SUN_BLOCK matrices are first copied to structure-of-arrays form (entry e
 * of every matrix of the block contiguous, in L1), so that the arithmetic below runs on
 * whole vectors of matrices (1.7x faster than matrix by matrix in L1); lanes past the end of
 * the data hold the identity, whose deviations are 0. Maxima are kept per lane. */
#define SUN_BLOCK 64

HOT static void sun_deviation3(const double *u, Py_ssize_t m, double *unit_out, double *det_out)
{
    double diag[SUN_BLOCK], off2[SUN_BLOCK], det2[SUN_BLOCK];
    double s[18][SUN_BLOCK];
    for (int k = 0; k < SUN_BLOCK; k++)
        diag[k] = off2[k] = det2[k] = 0.0;
    for (Py_ssize_t k0 = 0; k0 < m; k0 += SUN_BLOCK) {
        int nb = m - k0 < SUN_BLOCK ? (int)(m - k0) : SUN_BLOCK;
        for (int k = 0; k < nb; k++)
            for (int e = 0; e < 18; e++)
                s[e][k] = u[(k0 + k) * 18 + e];
        for (int k = nb; k < SUN_BLOCK; k++)
            for (int e = 0; e < 18; e++)
                s[e][k] = (e == 0 || e == 8 || e == 16) ? 1.0 : 0.0;
#define RE(i, j) s[2 * (3 * (i) + (j))][k]
#define IM(i, j) s[2 * (3 * (i) + (j)) + 1][k]
        for (int k = 0; k < SUN_BLOCK; k++) {
            /* written out (no loops over rows): the compiler then vectorises over k */
#define ROW_DEV(i)                                                                                         \
    fabs((RE(i, 0) * RE(i, 0) + IM(i, 0) * IM(i, 0)) + (RE(i, 1) * RE(i, 1) + IM(i, 1) * IM(i, 1)) +        \
         (RE(i, 2) * RE(i, 2) + IM(i, 2) * IM(i, 2)) - 1.0)
#define OFF2(i, j, out)                                                                                    \
    {                                                                                                      \
        double gr = RE(i, 0) * RE(j, 0) + IM(i, 0) * IM(j, 0);                                             \
        double gi = IM(i, 0) * RE(j, 0) - RE(i, 0) * IM(j, 0);                                             \
        gr += RE(i, 1) * RE(j, 1) + IM(i, 1) * IM(j, 1);                                                   \
        gi += IM(i, 1) * RE(j, 1) - RE(i, 1) * IM(j, 1);                                                   \
        gr += RE(i, 2) * RE(j, 2) + IM(i, 2) * IM(j, 2);                                                   \
        gi += IM(i, 2) * RE(j, 2) - RE(i, 2) * IM(j, 2);                                                   \
        out = gr * gr + gi * gi;                                                                           \
    }
            /* every maximum starts from 0 and takes a term only when it is larger: a NaN term never wins */
            double d0 = ROW_DEV(0), d1 = ROW_DEV(1), d2 = ROW_DEV(2);
            double d = d0 > 0.0 ? d0 : 0.0;
            d = d1 > d ? d1 : d;
            d = d2 > d ? d2 : d;
            double o01, o02, o12;
            OFF2(0, 1, o01)
            OFF2(0, 2, o02)
            OFF2(1, 2, o12)
            double o = o01 > 0.0 ? o01 : 0.0;
            o = o02 > o ? o02 : o;
            o = o12 > o ? o12 : o;
#undef ROW_DEV
#undef OFF2
            /* cofactors of row 0 from rows 1 and 2 */
            double c0r = (RE(1, 1) * RE(2, 2) - IM(1, 1) * IM(2, 2)) - (RE(1, 2) * RE(2, 1) - IM(1, 2) * IM(2, 1));
            double c0i = (RE(1, 1) * IM(2, 2) + IM(1, 1) * RE(2, 2)) - (RE(1, 2) * IM(2, 1) + IM(1, 2) * RE(2, 1));
            double c1r = (RE(1, 2) * RE(2, 0) - IM(1, 2) * IM(2, 0)) - (RE(1, 0) * RE(2, 2) - IM(1, 0) * IM(2, 2));
            double c1i = (RE(1, 2) * IM(2, 0) + IM(1, 2) * RE(2, 0)) - (RE(1, 0) * IM(2, 2) + IM(1, 0) * RE(2, 2));
            double c2r = (RE(1, 0) * RE(2, 1) - IM(1, 0) * IM(2, 1)) - (RE(1, 1) * RE(2, 0) - IM(1, 1) * IM(2, 0));
            double c2i = (RE(1, 0) * IM(2, 1) + IM(1, 0) * RE(2, 1)) - (RE(1, 1) * IM(2, 0) + IM(1, 1) * RE(2, 0));
            double dr = (RE(0, 0) * c0r - IM(0, 0) * c0i) + (RE(0, 1) * c1r - IM(0, 1) * c1i) + (RE(0, 2) * c2r - IM(0, 2) * c2i);
            double di = (RE(0, 0) * c0i + IM(0, 0) * c0r) + (RE(0, 1) * c1i + IM(0, 1) * c1r) + (RE(0, 2) * c2i + IM(0, 2) * c2r);
            dr -= 1.0;
            double q = dr * dr + di * di;
            diag[k] = d > diag[k] ? d : diag[k];
            off2[k] = o > off2[k] ? o : off2[k];
            det2[k] = q > det2[k] ? q : det2[k];
        }
#undef RE
#undef IM
    }
    double d = 0.0, o = 0.0, q = 0.0;
    for (int k = 0; k < SUN_BLOCK; k++) {
        d = diag[k] > d ? diag[k] : d;
        o = off2[k] > o ? off2[k] : o;
        q = det2[k] > q ? det2[k] : q;
    }
    o = sqrt(o);
    *unit_out = o > d ? o : d;
    *det_out = sqrt(q);
}

HOT static void sun_deviation2(const double *u, Py_ssize_t m, double *unit_out, double *det_out)
{
    double diag = 0.0, off2 = 0.0, det2 = 0.0;
    for (Py_ssize_t k = 0; k < m; k++) {
        const double *a = u + 8 * k;
#define RE(i, j) a[2 * (2 * (i) + (j))]
#define IM(i, j) a[2 * (2 * (i) + (j)) + 1]
        for (int i = 0; i < 2; i++) {
            double s = RE(i, 0) * RE(i, 0) + IM(i, 0) * IM(i, 0);
            s += RE(i, 1) * RE(i, 1) + IM(i, 1) * IM(i, 1);
            double dv = fabs(s - 1.0);
            if (dv > diag)
                diag = dv;
        }
        double gr = RE(0, 0) * RE(1, 0) + IM(0, 0) * IM(1, 0);
        double gi = IM(0, 0) * RE(1, 0) - RE(0, 0) * IM(1, 0);
        gr += RE(0, 1) * RE(1, 1) + IM(0, 1) * IM(1, 1);
        gi += IM(0, 1) * RE(1, 1) - RE(0, 1) * IM(1, 1);
        double g2 = gr * gr + gi * gi;
        if (g2 > off2)
            off2 = g2;
        double dr = (RE(0, 0) * RE(1, 1) - IM(0, 0) * IM(1, 1)) - (RE(0, 1) * RE(1, 0) - IM(0, 1) * IM(1, 0));
        double di = (RE(0, 0) * IM(1, 1) + IM(0, 0) * RE(1, 1)) - (RE(0, 1) * IM(1, 0) + IM(0, 1) * RE(1, 0));
        dr -= 1.0;
        double d2 = dr * dr + di * di;
        if (d2 > det2)
            det2 = d2;
#undef RE
#undef IM
    }
    double off = sqrt(off2);
    *unit_out = off > diag ? off : diag;
    *det_out = sqrt(det2);
}

static PyObject *k_sun_deviation(PyObject *self, PyObject *args)
{
    Py_buffer values;
    int n;
    if (!PyArg_ParseTuple(args, "y*i", &values, &n))
        return NULL;
    PyObject *result = NULL;
    if (n != 2 && n != 3) {
        PyErr_Format(PyExc_ValueError, "sun_deviation: N must be 2 or 3, found %d", n);
    } else if (values.len % (16 * n * n)) {
        PyErr_Format(PyExc_ValueError, "sun_deviation: %zd bytes is not a whole number of %dx%d complex128 matrices",
                     values.len, n, n);
    } else if (((uintptr_t)values.buf) % sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "sun_deviation: the values are not aligned to 8 bytes");
    } else {
        double unit = 0.0, det = 0.0;
        Py_ssize_t m = values.len / (16 * n * n);
        Py_BEGIN_ALLOW_THREADS
        if (n == 3)
            sun_deviation3(values.buf, m, &unit, &det);
        else
            sun_deviation2(values.buf, m, &unit, &det);
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("(dd)", unit, det);
    }
    PyBuffer_Release(&values);
    return result;
}


/* ---------------------------------------------------------------- xor_sites */

/*
 * The SciDAC checksum's reduction (flowplug/adapters/checksums.py, ScidacChecksum): XOR
 * site i of the data (site_bytes bytes each) into row (first_site + i) mod classes of the
 * accumulator (classes x site_bytes bytes).
 */
HOT static void xor_sites_loop(const unsigned char *data, unsigned char *acc, Py_ssize_t nsites, Py_ssize_t site_bytes,
                               Py_ssize_t classes, Py_ssize_t row)
{
    for (Py_ssize_t i = 0; i < nsites; i++) {
        const unsigned char *s = data + i * site_bytes;
        unsigned char *a = acc + row * site_bytes;
        Py_ssize_t b = 0;
        for (; b + 8 <= site_bytes; b += 8) {
            uint64_t x, y;
            memcpy(&x, s + b, 8);
            memcpy(&y, a + b, 8);
            y ^= x;
            memcpy(a + b, &y, 8);
        }
        for (; b < site_bytes; b++)
            a[b] ^= s[b];
        if (++row == classes)
            row = 0;
    }
}

static PyObject *k_xor_sites(PyObject *self, PyObject *args)
{
    Py_buffer data, acc;
    Py_ssize_t site_bytes, first_site;
    if (!PyArg_ParseTuple(args, "y*w*nn", &data, &acc, &site_bytes, &first_site))
        return NULL;
    PyObject *result = NULL;
    if (site_bytes <= 0 || first_site < 0 || data.len % site_bytes || acc.len % site_bytes || acc.len == 0) {
        PyErr_Format(PyExc_ValueError,
                     "xor_sites: %zd data bytes and %zd accumulator bytes for sites of %zd bytes from site %zd",
                     data.len, acc.len, site_bytes, first_site);
    } else {
        Py_ssize_t classes = acc.len / site_bytes;
        Py_BEGIN_ALLOW_THREADS
        xor_sites_loop(data.buf, acc.buf, data.len / site_bytes, site_bytes, classes, first_site % classes);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&acc);
    return result;
}

/* -------------------------------------------------------------------- crc32 */

/*
 * zlib's CRC-32 (reflected polynomial 0xEDB88320, bits inverted before and after).
 * On x86-64 CPUs with PCLMULQDQ the message is folded 64 bytes at a time with carry-less
 * products (Gopal et al., "Fast CRC computation for generic polynomials using PCLMULQDQ
 * instruction", Intel, 2009): a 128-bit block B followed by D bits of message has the
 * same CRC as (B mod P shifted by D bits) XORed into the block D bits further on, and
 * x^k mod P for the folding distances are the constants below. What remains (at most one
 * 16-byte fold state and 15 bytes) goes through the byte table. Elsewhere: the byte table
 * only (slow; flowplug.compiled then uses zlib instead).
 */
static uint32_t crc_table[256];

static void crc_table_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        crc_table[i] = c;
    }
}

/* the register after the bytes (no inversion): the raw CRC update */
static uint32_t crc_bytes(uint32_t c, const unsigned char *p, Py_ssize_t len)
{
    for (Py_ssize_t i = 0; i < len; i++)
        c = crc_table[(c ^ p[i]) & 0xffu] ^ (c >> 8);
    return c;
}

/* whether no word (of `word` = 4 or 8 bytes; 0: no check) of p[0 .. len) is a NaN or an Inf */
static int words_finite(const unsigned char *p, Py_ssize_t len, int word)
{
    if (word == 8) {
        for (Py_ssize_t i = 0; i + 8 <= len; i += 8) {
            uint64_t v;
            memcpy(&v, p + i, 8);
            if (((v >> 52) & 0x7ffu) == 0x7ffu)
                return 0;
        }
    } else if (word == 4) {
        for (Py_ssize_t i = 0; i + 4 <= len; i += 4) {
            uint32_t v;
            memcpy(&v, p + i, 4);
            if (((v >> 23) & 0xffu) == 0xffu)
                return 0;
        }
    }
    return 1;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_CLMUL_PATH 1

/* x^(512+32) and x^(512-32) mod P (bit reflected, shifted): fold by four blocks;
 * x^(128+32) and x^(128-32) mod P: fold by one block */
#define K_FOLD4_LO 0x0154442bd4ULL
#define K_FOLD4_HI 0x01c6e41596ULL
#define K_FOLD1_LO 0x01751997d0ULL
#define K_FOLD1_HI 0x00ccaa009eULL

__attribute__((target("pclmul,sse4.1"))) static inline __m128i fold(__m128i x, __m128i k, __m128i next)
{
    __m128i lo = _mm_clmulepi64_si128(x, k, 0x00);
    __m128i hi = _mm_clmulepi64_si128(x, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

/* lanes of v (words of `word` bytes: 4 or 8; 0 = no check) whose exponent bits are all set */
__attribute__((target("pclmul,sse4.1"))) static inline __m128i nonfinite(__m128i v, int word)
{
    if (word == 8) {
        const __m128i e = _mm_set1_epi64x(0x7ff0000000000000LL);
        return _mm_cmpeq_epi64(_mm_and_si128(v, e), e);
    }
    if (word == 4) {
        const __m128i e = _mm_set1_epi32(0x7f800000);
        return _mm_cmpeq_epi32(_mm_and_si128(v, e), e);
    }
    return _mm_setzero_si128();
}

__attribute__((target("pclmul,sse4.1"))) static inline __m128i load_checked(const unsigned char *p, int word, __m128i *bad)
{
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    *bad = _mm_or_si128(*bad, nonfinite(v, word));
    return v;
}

/* raw register update over len >= 64 bytes; *finite: no NaN/Inf word (when word != 0) */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_clmul(uint32_t c, const unsigned char *p, Py_ssize_t len,
                                                                    int word, int *finite)
{
    __m128i bad = _mm_setzero_si128();
    __m128i x0 = load_checked(p + 0, word, &bad);
    __m128i x1 = load_checked(p + 16, word, &bad);
    __m128i x2 = load_checked(p + 32, word, &bad);
    __m128i x3 = load_checked(p + 48, word, &bad);
    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)c));
    p += 64;
    len -= 64;
    const __m128i k4 = _mm_set_epi64x((long long)K_FOLD4_HI, (long long)K_FOLD4_LO);
    while (len >= 64) {
        x0 = fold(x0, k4, load_checked(p + 0, word, &bad));
        x1 = fold(x1, k4, load_checked(p + 16, word, &bad));
        x2 = fold(x2, k4, load_checked(p + 32, word, &bad));
        x3 = fold(x3, k4, load_checked(p + 48, word, &bad));
        p += 64;
        len -= 64;
    }
    const __m128i k1 = _mm_set_epi64x((long long)K_FOLD1_HI, (long long)K_FOLD1_LO);
    x0 = fold(x0, k1, x1);
    x0 = fold(x0, k1, x2);
    x0 = fold(x0, k1, x3);
    while (len >= 16) {
        x0 = fold(x0, k1, load_checked(p, word, &bad));
        p += 16;
        len -= 16;
    }
    unsigned char state[16];
    _mm_storeu_si128((__m128i *)state, x0);
    *finite = _mm_testz_si128(bad, bad) && words_finite(p, len, word);
    return crc_bytes(crc_bytes(0u, state, 16), p, len);
}

static int have_clmul(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
}
#else
#define HAVE_CLMUL_PATH 0
static int have_clmul(void) { return 0; }
static uint32_t crc_clmul(uint32_t c, const unsigned char *p, Py_ssize_t len, int word, int *finite)
{
    *finite = words_finite(p, len, word);
    return crc_bytes(c, p, len);
}
#endif

static int clmul_ok = 0;

static PyObject *k_crc32(PyObject *self, PyObject *args)
{
    Py_buffer data;
    unsigned long value = 0;
    int word = 0;
    if (!PyArg_ParseTuple(args, "y*|ki", &data, &value, &word))
        return NULL;
    if (word != 0 && word != 4 && word != 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "crc32: word must be 0, 4 or 8 bytes, found %d", word);
    }
    if (word && data.len % word) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "crc32: %zd bytes is not a whole number of %d-byte words", data.len, word);
    }
    uint32_t c = ~(uint32_t)value;
    int finite = 1;
    Py_BEGIN_ALLOW_THREADS
    if (clmul_ok && data.len >= 64) {
        c = crc_clmul(c, data.buf, data.len, word, &finite);
    } else {
        finite = words_finite(data.buf, data.len, word);
        c = crc_bytes(c, data.buf, data.len);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (!word)
        return PyLong_FromUnsignedLong((unsigned long)(~c));
    return Py_BuildValue("(kO)", (unsigned long)(~c), finite ? Py_True : Py_False);
}

/* ------------------------------------------------------ network convolutions */

/*
 * The gathered periodic convolutions of the coupling networks (plugins/flow_nets.py,
 * ConvNet.forward_at), float32, every tensor laid out (channels, rows, batch) with the batch
 * innermost, so that B consecutive floats are one row of one channel.
 *
 * conv_gather: out[q, s, b] = bias[q] + sum over a, then t of W(q, a, t) h[a, idx[t n + s], b],
 *   W(q, a, t) = w[q sq + a sa + t st], one fused multiply-add per term in that order (a
 *   ascending, t ascending within a); then, by mode: 0 nothing, 1 the LeakyReLU
 *   (x > 0 ? x : slope x), 2 the LeakyReLU's derivative at gate (gate[q, s, b] > 0 ? x :
 *   slope x, gate laid out as out). A row index equal to zero_row reads zeros. Batch entries
 *   are the lanes of one vector (the tail masked), or, for one to three entries, the lanes
 *   hold output channels; either way every output entry goes through the same operations
 *   whatever its place in the batch, the batch's size or the split between threads.
 * conv_weight_grad: gw[o, a T + t] = sum over s, b of g[o, s, b] h[a, idx[t n + s], b] and
 *   gb[o] = sum of g[o, s, b]; the sites are cut into tiles set by n alone, each tile summed in
 *   a fixed order, the tiles added in order: the result does not depend on the threads.
 *
 * Tensors arrive as addresses with their numbers of entries; every size and every row index
 * is checked against them before anything is read or written (dtype and layout are the
 * caller's: flowplug/compiled.py). x86-64 with AVX2 and FMA (checked when the module loads:
 * conv_ok) under Linux and GCC or clang; elsewhere flowplug.compiled reports the kernels
 * missing and the networks run torch.
 */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define HAVE_CONV 1
#include <pthread.h>
#include <stdlib.h>

static int conv_ok = 0;

typedef struct {
    float *out, *part;
    const float *h, *wp, *bp, *gate, *g, *zeros, *ones;
    const int64_t *idx;
    Py_ssize_t Q, A, T, R, n, B, zero_row, s0, s1, t0, t1, ntiles;
    float slope;
    int mode, qb, nb, bad;
} conv_job;

/* rows[k] (k = a T + t, K = A T of them) of output site s, pointers to rows of B floats
 * (zero_row: a row of zeros); 0 when an index is out of range */
static int conv_rows(const conv_job *j, Py_ssize_t s, const float **rows)
{
    Py_ssize_t T = j->T, plane = j->R * j->B;
    for (Py_ssize_t t = 0; t < T; t++) { /* each tap's row looked up and checked once */
        int64_t r = j->idx[t * j->n + s];
        if (r == j->zero_row) {
            for (Py_ssize_t a = 0; a < j->A; a++)
                rows[a * T + t] = j->zeros;
            continue;
        }
        if (r < 0 || r >= j->R)
            return 0;
        const float *p = j->h + r * j->B;
        for (Py_ssize_t a = 0; a < j->A; a++, p += plane)
            rows[a * T + t] = p;
    }
    return 1;
}

/* a mask of the first `lanes` (0 .. 8) of eight float lanes (AVX2 like its callers: an __m256i
 * returned from a function built without AVX would travel by another convention, which at -O1
 * and below, where it is not inlined, crashed) */
__attribute__((target("avx2,fma"))) static __m256i lane_mask(Py_ssize_t lanes)
{
    int32_t m[8];
    for (int i = 0; i < 8; i++)
        m[i] = i < lanes ? -1 : 0;
    __m256i v;
    memcpy(&v, m, sizeof v);
    return v;
}

/*
 * QB output channels (packed weights wb: K x QB, biases bb: QB) of one site for NB blocks of
 * eight batch entries from b0: acc[q][i] += w[q, k] * row_k[b0 + 8 i ...] for k = 0 .. K - 1 in
 * order. masks: NULL when every block is whole, else one lane mask per block (a block past
 * the batch: no lanes, nothing stored). out and gate point at (channel 0, this site, b0).
 */
#define GATHER_KERNEL(QB, NB)                                                                               \
    __attribute__((target("avx2,fma"))) static void gather_##QB##_##NB(                                   \
        float *out, const float *gate, Py_ssize_t cstride, const float **rows, Py_ssize_t b0, Py_ssize_t K,   \
        const float *wb, const float *bb, int on, const __m256i *masks, float slope, int mode)            \
    {                                                                                                      \
        __m256 acc[QB][NB];                                                                                \
        _Pragma("GCC unroll 8") for (int q = 0; q < QB; q++)                                               \
            _Pragma("GCC unroll 8") for (int i = 0; i < NB; i++) acc[q][i] = _mm256_broadcast_ss(bb + q);  \
        if (!masks) {                                                                                      \
            for (Py_ssize_t k = 0; k < K; k++) {                                                           \
                const float *r = rows[k] + b0, *wk = wb + k * QB;                                          \
                __m256 v[NB];                                                                              \
                _Pragma("GCC unroll 8") for (int i = 0; i < NB; i++) v[i] = _mm256_loadu_ps(r + 8 * i);    \
                _Pragma("GCC unroll 8") for (int q = 0; q < QB; q++) {                                     \
                    __m256 wq = _mm256_broadcast_ss(wk + q);                                               \
                    _Pragma("GCC unroll 8") for (int i = 0; i < NB; i++) acc[q][i] =                       \
                        _mm256_fmadd_ps(wq, v[i], acc[q][i]);                                              \
                }                                                                                          \
            }                                                                                              \
        } else {                                                                                           \
            for (Py_ssize_t k = 0; k < K; k++) {                                                           \
                const float *r = rows[k] + b0, *wk = wb + k * QB;                                          \
                __m256 v[NB];                                                                              \
                _Pragma("GCC unroll 8") for (int i = 0; i < NB; i++) v[i] =                                \
                    _mm256_maskload_ps(_mm256_testz_si256(masks[i], masks[i]) ? r : r + 8 * i, masks[i]);  \
                _Pragma("GCC unroll 8") for (int q = 0; q < QB; q++) {                                     \
                    __m256 wq = _mm256_broadcast_ss(wk + q);                                               \
                    _Pragma("GCC unroll 8") for (int i = 0; i < NB; i++) acc[q][i] =                       \
                        _mm256_fmadd_ps(wq, v[i], acc[q][i]);                                              \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        const __m256 sl = _mm256_set1_ps(slope), zero = _mm256_setzero_ps();                               \
        /* constant bounds, so that acc stays in registers */                                             \
        _Pragma("GCC unroll 8") for (int q = 0; q < QB; q++)                                               \
            _Pragma("GCC unroll 8") for (int i = 0; i < NB; i++) {                                         \
                if (q >= on || (masks && _mm256_testz_si256(masks[i], masks[i])))                          \
                    continue;                                                                              \
                __m256 x = acc[q][i];                                                                      \
                float *dst = out + q * cstride + 8 * i;                                                    \
                if (mode == 1) {                                                                           \
                    x = _mm256_blendv_ps(_mm256_mul_ps(x, sl), x, _mm256_cmp_ps(x, zero, _CMP_GT_OQ));     \
                } else if (mode == 2) {                                                                    \
                    const float *gp = gate + q * cstride + 8 * i;                                          \
                    __m256 gv = masks ? _mm256_maskload_ps(gp, masks[i]) : _mm256_loadu_ps(gp);            \
                    x = _mm256_blendv_ps(_mm256_mul_ps(x, sl), x, _mm256_cmp_ps(gv, zero, _CMP_GT_OQ));    \
                }                                                                                          \
                if (masks)                                                                                 \
                    _mm256_maskstore_ps(dst, masks[i], x);                                                 \
                else                                                                                       \
                    _mm256_storeu_ps(dst, x);                                                              \
            }                                                                                              \
    }

GATHER_KERNEL(8, 1)
GATHER_KERNEL(4, 2)
GATHER_KERNEL(4, 1)
GATHER_KERNEL(2, 4)
GATHER_KERNEL(2, 2)
GATHER_KERNEL(2, 1)
GATHER_KERNEL(1, 8)
GATHER_KERNEL(1, 4)
GATHER_KERNEL(1, 2)
GATHER_KERNEL(1, 1)

typedef void (*gather_fn)(float *, const float *, Py_ssize_t, const float **, Py_ssize_t, Py_ssize_t, const float *,
                          const float *, int, const __m256i *, float, int);

static gather_fn gather_kernel(int QB, int NB)
{
    switch (QB * 16 + NB) {
    case 8 * 16 + 1: return gather_8_1;
    case 4 * 16 + 2: return gather_4_2;
    case 4 * 16 + 1: return gather_4_1;
    case 2 * 16 + 4: return gather_2_4;
    case 2 * 16 + 2: return gather_2_2;
    case 2 * 16 + 1: return gather_2_1;
    case 1 * 16 + 8: return gather_1_8;
    case 1 * 16 + 4: return gather_1_4;
    case 1 * 16 + 2: return gather_1_2;
    default: return gather_1_1; /* 1 x 1: conv_blocking gives no other pair */
    }
}

/* the blocking of gather_QB_NB for Q output channels and B batch entries: NB blocks of eight
 * batch entries (no more than the batch fills) and QB channels, QB NB <= 8 accumulators; with
 * a full batch 4 x 2 (8 x 1 ran 10-15 % slower on AVX2), 2 x 4 for two channels, 1 x 8 for one */
static void conv_blocking(Py_ssize_t Q, Py_ssize_t B, int *QB, int *NB)
{
    int qb = Q >= 3 ? 4 : Q == 2 ? 2 : 1, nb = 1;
    while (nb < 8 / qb && 8 * nb < B)
        nb *= 2;
    while (qb * nb < 8 && qb < Q) /* lanes the batch leaves: more channels instead */
        qb *= 2;
    *QB = qb > 8 ? 8 : qb;
    *NB = nb;
}

__attribute__((target("avx2,fma"))) static void *gather_work(void *arg)
{
    conv_job *j = arg;
    int QB = j->qb, NB = j->nb;
    gather_fn fn = gather_kernel(QB, NB);
    Py_ssize_t K = j->A * j->T, nqb = (j->Q + QB - 1) / QB, cstride = j->n * j->B, group = 8 * NB;
    const float **rows = malloc(sizeof(float *) * (size_t)(K ? K : 1));
    if (!rows) {
        j->bad = 2;
        return NULL;
    }
    __m256i masks[8];
    Py_ssize_t tail0 = j->B - j->B % group; /* the first batch entry of the partial group */
    for (int i = 0; i < NB; i++) {
        Py_ssize_t lanes = j->B - tail0 - 8 * i;
        masks[i] = lane_mask(lanes < 0 ? 0 : lanes > 8 ? 8 : lanes);
    }
    for (Py_ssize_t s = j->s0; s < j->s1; s++) {
        if (!conv_rows(j, s, rows)) {
            j->bad = 1;
            break;
        }
        for (Py_ssize_t qb = 0; qb < nqb; qb++) {
            int on = (int)(j->Q - qb * QB < QB ? j->Q - qb * QB : QB);
            Py_ssize_t at = (qb * QB * j->n + s) * j->B;
            const float *wb = j->wp + qb * K * QB, *bb = j->bp + qb * QB;
            for (Py_ssize_t b0 = 0; b0 < j->B; b0 += group)
                fn(j->out + at + b0, j->gate ? j->gate + at + b0 : NULL, cstride, rows, b0, K, wb, bb, on,
                   b0 < tail0 ? NULL : masks, j->slope, j->mode);
        }
    }
    free(rows);
    return NULL;
}

/*
 * Small batches: the eight lanes hold eight output channels of one batch entry (packed weights
 * wp: K x 8 per block of eight channels), four sites at a time. Each entry is again
 * bias + its fused multiply-adds over k in order, with the same operands as in gather_QB_NB
 * (fma(w, h, acc) and fma(h, w, acc) are one rounding of the same value), so an entry's result
 * does not depend on which form ran: a configuration alone equals its row of a batch.
 */
__attribute__((target("avx2,fma"))) static void *gather_channels_work(void *arg)
{
    conv_job *j = arg;
    Py_ssize_t K = j->A * j->T, nqb = (j->Q + 7) / 8, cstride = j->n * j->B;
    const float **rows = malloc(sizeof(float *) * (size_t)(4 * (K ? K : 1)));
    if (!rows) {
        j->bad = 2;
        return NULL;
    }
    const __m256 sl = _mm256_set1_ps(j->slope), zero = _mm256_setzero_ps();
    for (Py_ssize_t s0 = j->s0; s0 < j->s1 && !j->bad; s0 += 4) {
        int ns = (int)(j->s1 - s0 < 4 ? j->s1 - s0 : 4);
        for (int i = 0; i < 4; i++) /* sites past the end repeat the last one (not stored) */
            if (!conv_rows(j, s0 + (i < ns ? i : ns - 1), rows + i * K)) {
                j->bad = 1;
                break;
            }
        if (j->bad)
            break;
        for (Py_ssize_t qb = 0; qb < nqb; qb++) {
            int on = (int)(j->Q - qb * 8 < 8 ? j->Q - qb * 8 : 8);
            const float *wb = j->wp + qb * K * 8;
            __m256 bias = _mm256_loadu_ps(j->bp + qb * 8);
            for (Py_ssize_t b = 0; b < j->B; b++) {
                __m256 acc[4];
                _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[i] = bias;
                for (Py_ssize_t k = 0; k < K; k++) {
                    __m256 wv = _mm256_loadu_ps(wb + k * 8);
                    _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[i] =
                        _mm256_fmadd_ps(wv, _mm256_broadcast_ss(rows[i * K + k] + b), acc[i]);
                }
                _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
                    if (i >= ns)
                        continue;
                    __m256 x = acc[i];
                    Py_ssize_t at = (qb * 8 * j->n + s0 + i) * j->B + b;
                    if (j->mode == 1) {
                        x = _mm256_blendv_ps(_mm256_mul_ps(x, sl), x, _mm256_cmp_ps(x, zero, _CMP_GT_OQ));
                    } else if (j->mode == 2) {
                        float gv[8] = {0};
                        for (int q = 0; q < on; q++)
                            gv[q] = j->gate[at + q * cstride];
                        x = _mm256_blendv_ps(_mm256_mul_ps(x, sl), x, _mm256_cmp_ps(_mm256_loadu_ps(gv), zero, _CMP_GT_OQ));
                    }
                    float xv[8];
                    _mm256_storeu_ps(xv, x);
                    for (int q = 0; q < on; q++)
                        j->out[at + q * cstride] = xv[q];
                }
            }
        }
    }
    free(rows);
    return NULL;
}

/* whether the channel form is the cheaper for Q output channels and B batch entries: about
 * B ceil(Q / 8) cycles per site and k against 4 ceil(Q / QB) ceil(B / (8 NB)) for gather_QB_NB */
static int conv_channels(Py_ssize_t Q, Py_ssize_t B, int QB, int NB)
{
    Py_ssize_t lanes = (Q + QB - 1) / QB * ((B + 8 * NB - 1) / (8 * NB)) * 4;
    return B * ((Q + 7) / 8) < lanes;
}

/* a fixed order of the eight lanes */
__attribute__((target("avx2,fma"))) static float lane_sum(__m256 v)
{
    float x[8];
    _mm256_storeu_ps(x, v);
    return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

/*
 * One tile of the weight gradient for QB output channels from ob and KB columns from kb (column
 * K: the bias, a row of ones): acc[q][c] += g[ob + q, s, b] row_{kb + c}(s)[b] over the tile's
 * sites s and the batch in blocks of eight, then the lanes summed into part[(ob + q) (K + 1) + kb + c].
 * rows: (sites of the tile) x (K + 1) pointers; g rows past O and columns past K read zeros.
 */
#define WGRAD_KERNEL(QB, KB)                                                                                \
    __attribute__((target("avx2,fma"))) static void wgrad_##QB##_##KB(                                    \
        float *part, const float *g, Py_ssize_t cstride, const float **rows, Py_ssize_t s0, Py_ssize_t ns,    \
        Py_ssize_t K, Py_ssize_t B, Py_ssize_t O, Py_ssize_t ob, Py_ssize_t kb, const float *zeros)           \
    {                                                                                                      \
        __m256 acc[QB][KB];                                                                                \
        const float *gq[QB];                                                                               \
        Py_ssize_t gstep[QB];                                                                              \
        _Pragma("GCC unroll 8") for (int q = 0; q < QB; q++) {                                             \
            int in = ob + q < O;                                                                           \
            gq[q] = in ? g + (ob + q) * cstride + s0 * B : zeros;                                          \
            gstep[q] = in ? B : 0;                                                                         \
            _Pragma("GCC unroll 8") for (int c = 0; c < KB; c++) acc[q][c] = _mm256_setzero_ps();          \
        }                                                                                                  \
        Py_ssize_t full = B / 8, tail = B % 8;                                                             \
        __m256i mask = lane_mask(tail);                                                                    \
        for (Py_ssize_t s = 0; s < ns; s++) {                                                              \
            const float *hr[KB];                                                                           \
            _Pragma("GCC unroll 8") for (int c = 0; c < KB; c++) hr[c] =                                   \
                kb + c <= K ? rows[s * (K + 1) + kb + c] : zeros;                                          \
            for (Py_ssize_t b = 0; b < full; b++) {                                                        \
                __m256 gv[QB];                                                                             \
                _Pragma("GCC unroll 8") for (int q = 0; q < QB; q++) gv[q] =                               \
                    _mm256_loadu_ps(gq[q] + s * gstep[q] + 8 * b);                                         \
                _Pragma("GCC unroll 8") for (int c = 0; c < KB; c++) {                                     \
                    __m256 hv = _mm256_loadu_ps(hr[c] + 8 * b);                                            \
                    _Pragma("GCC unroll 8") for (int q = 0; q < QB; q++) acc[q][c] =                       \
                        _mm256_fmadd_ps(gv[q], hv, acc[q][c]);                                             \
                }                                                                                          \
            }                                                                                              \
            if (tail) {                                                                                    \
                __m256 gv[QB];                                                                             \
                _Pragma("GCC unroll 8") for (int q = 0; q < QB; q++) gv[q] =                               \
                    _mm256_maskload_ps(gq[q] + s * gstep[q] + 8 * full, mask);                             \
                _Pragma("GCC unroll 8") for (int c = 0; c < KB; c++) {                                     \
                    __m256 hv = _mm256_maskload_ps(hr[c] + 8 * full, mask);                                \
                    _Pragma("GCC unroll 8") for (int q = 0; q < QB; q++) acc[q][c] =                       \
                        _mm256_fmadd_ps(gv[q], hv, acc[q][c]);                                             \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        _Pragma("GCC unroll 8") for (int q = 0; q < QB; q++)                                               \
            _Pragma("GCC unroll 8") for (int c = 0; c < KB; c++) if (ob + q < O && kb + c <= K)            \
                part[(ob + q) * (K + 1) + kb + c] = lane_sum(acc[q][c]);                                   \
    }

WGRAD_KERNEL(4, 2)
WGRAD_KERNEL(2, 4)
WGRAD_KERNEL(1, 8)

typedef void (*wgrad_fn)(float *, const float *, Py_ssize_t, const float **, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                         Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, const float *);

/* tiles t0 .. t1 of the weight gradient: part[tile][o][K + 1] (the last column: the bias) */
__attribute__((target("avx2,fma"))) static void *wgrad_work(void *arg)
{
    conv_job *j = arg;
    Py_ssize_t K = j->A * j->T, O = j->Q, cstride = j->n * j->B;
    int QB = O >= 3 ? 4 : O == 2 ? 2 : 1, KB = 8 / QB;
    wgrad_fn fn = QB == 4 ? wgrad_4_2 : QB == 2 ? wgrad_2_4 : wgrad_1_8;
    Py_ssize_t most = (j->n + j->ntiles - 1) / j->ntiles + 1; /* sites in a tile, at most */
    const float **rows = malloc(sizeof(float *) * (size_t)(most * (K + 1)));
    if (!rows) {
        j->bad = 2;
        return NULL;
    }
    for (Py_ssize_t tile = j->t0; tile < j->t1; tile++) {
        Py_ssize_t s0 = tile * j->n / j->ntiles, s1 = (tile + 1) * j->n / j->ntiles;
        float *part = j->part + tile * O * (K + 1);
        for (Py_ssize_t s = s0; s < s1; s++) {
            if (!conv_rows(j, s, rows + (s - s0) * (K + 1))) {
                j->bad = 1;
                break;
            }
            rows[(s - s0) * (K + 1) + K] = j->ones;
        }
        if (j->bad)
            break;
        for (Py_ssize_t ob = 0; ob < O; ob += QB)
            for (Py_ssize_t kb = 0; kb <= K; kb += KB)
                fn(part, j->g, cstride, rows, s0, s1 - s0, K, j->B, O, ob, kb, j->zeros);
    }
    free(rows);
    return NULL;
}

/* work(jobs[i]) for i < nj: on nj - 1 new threads and this one (a job whose thread did not
 * start runs here after the others) */
static void run_jobs(void *(*work)(void *), conv_job *jobs, int nj)
{
    pthread_t tid[64];
    int started = 0;
    for (int i = 1; i < nj && pthread_create(&tid[i], NULL, work, &jobs[i]) == 0; i++)
        started = i;
    work(&jobs[0]);
    for (int i = 1; i <= started; i++)
        pthread_join(tid[i], NULL);
    for (int i = started + 1; i < nj; i++)
        work(&jobs[i]);
}

/* threads for `macs` multiply-adds: one per 2^23 (about 0.25 ms on one core; a thread is started
 * per call, so less work would not pay for it), at most nthreads and 64 */
static int conv_threads(double macs, int nthreads, Py_ssize_t units)
{
    int nt = (int)(macs / 8388608.0);
    if (nt > nthreads)
        nt = nthreads;
    if (nt > 64)
        nt = 64;
    if (nt > units)
        nt = (int)units;
    return nt < 1 ? 1 : nt;
}

static PyObject *k_conv_gather(PyObject *self, PyObject *args)
{
    unsigned long long p_out, p_h, p_w, p_bias, p_idx, p_gate;
    Py_ssize_t c_out, c_h, c_w, c_bias, c_idx, c_gate; /* the entries of each (0: no tensor) */
    Py_ssize_t Q, A, T, R, n, B, zero_row, sq, sa, st;
    float slope;
    int mode, nthreads;
    if (!PyArg_ParseTuple(args, "KnKnKnKnKnKnnnnnnnnnnnfii", &p_out, &c_out, &p_h, &c_h, &p_w, &c_w, &p_bias, &c_bias,
                          &p_idx, &c_idx, &p_gate, &c_gate, &Q, &A, &T, &R, &n, &B, &zero_row, &sq, &sa, &st, &slope,
                          &mode, &nthreads))
        return NULL;
    if (!conv_ok)
        return PyErr_Format(PyExc_RuntimeError, "conv_gather: this CPU lacks AVX2 or FMA");
    /* every size against the tensors' entries (no read or write outside them), without overflow */
    Py_ssize_t qnb, arb, qat, tn, wlast;
    int bad = Q < 1 || A < 1 || T < 1 || R < 0 || n < 0 || B < 0 || mode < 0 || mode > 2 || sq < 0 || sa < 0 ||
              st < 0 || __builtin_mul_overflow(Q, n, &qnb) || __builtin_mul_overflow(qnb, B, &qnb) ||
              __builtin_mul_overflow(A, R, &arb) || __builtin_mul_overflow(arb, B, &arb) ||
              __builtin_mul_overflow(Q, A, &qat) || __builtin_mul_overflow(qat, T, &qat) ||
              __builtin_mul_overflow(T, n, &tn);
    if (!bad) {
        wlast = (Q - 1) * sq + (A - 1) * sa + (T - 1) * st; /* the last weight read: < c_w */
        bad = c_out != qnb || c_h != arb || c_w != qat || wlast >= c_w || c_idx != tn || (p_bias && c_bias != Q) ||
              (mode == 2 && (!p_gate || c_gate != qnb)) || (qnb && (!p_out || !p_h || !p_w || !p_idx));
    }
    if (bad)
        return PyErr_Format(PyExc_ValueError,
                            "conv_gather: sizes that do not fit the tensors (Q %zd, A %zd, T %zd, R %zd, n %zd, B %zd, "
                            "mode %d; entries: out %zd, h %zd, w %zd, bias %zd, idx %zd, gate %zd)",
                            Q, A, T, R, n, B, mode, c_out, c_h, c_w, c_bias, c_idx, c_gate);
    if (qnb == 0)
        Py_RETURN_NONE;
    int QB, NB;
    conv_blocking(Q, B, &QB, &NB);
    int channels = conv_channels(Q, B, QB, NB);
    if (channels)
        QB = 8, NB = 1;
    Py_ssize_t K = A * T, nqb = (Q + QB - 1) / QB;
    float *wp = calloc((size_t)(nqb * QB * (K + 1) + B + 8), sizeof(float));
    if (!wp)
        return PyErr_NoMemory();
    float *bp = wp + nqb * K * QB, *zeros = bp + nqb * QB;
    const float *w = (const float *)(uintptr_t)p_w, *bias = (const float *)(uintptr_t)p_bias;
    for (Py_ssize_t q = 0; q < Q; q++) { /* block q / QB: K rows of QB weights; zeros past Q */
        for (Py_ssize_t a = 0; a < A; a++)
            for (Py_ssize_t t = 0; t < T; t++)
                wp[((q / QB) * K + a * T + t) * QB + q % QB] = w[q * sq + a * sa + t * st];
        bp[q] = bias ? bias[q] : 0.0f;
    }
    conv_job jobs[64];
    int nj = conv_threads((double)Q * K * n * B, nthreads, n);
    for (int i = 0; i < nj; i++) {
        conv_job j = {(float *)(uintptr_t)p_out, NULL, (const float *)(uintptr_t)p_h, wp, bp,
                      (const float *)(uintptr_t)p_gate, NULL, zeros, NULL, (const int64_t *)(uintptr_t)p_idx,
                      Q, A, T, R, n, B, zero_row, i * n / nj, (i + 1) * n / nj, 0, 0, 0, slope, mode, QB, NB, 0};
        jobs[i] = j;
    }
    Py_BEGIN_ALLOW_THREADS
    run_jobs(channels ? gather_channels_work : gather_work, jobs, nj);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < nj; i++)
        bad |= jobs[i].bad;
    free(wp);
    if (bad & 2)
        return PyErr_NoMemory();
    if (bad)
        return PyErr_Format(PyExc_IndexError, "conv_gather: a row index outside 0 .. %zd (and not %zd)", R - 1, zero_row);
    Py_RETURN_NONE;
}

static PyObject *k_conv_weight_grad(PyObject *self, PyObject *args)
{
    unsigned long long p_gw, p_gb, p_g, p_h, p_idx;
    Py_ssize_t c_gw, c_gb, c_g, c_h, c_idx; /* the entries of each (0: no tensor) */
    Py_ssize_t O, A, T, R, n, B, zero_row;
    int nthreads;
    if (!PyArg_ParseTuple(args, "KnKnKnKnKnnnnnnnni", &p_gw, &c_gw, &p_gb, &c_gb, &p_g, &c_g, &p_h, &c_h, &p_idx,
                          &c_idx, &O, &A, &T, &R, &n, &B, &zero_row, &nthreads))
        return NULL;
    if (!conv_ok)
        return PyErr_Format(PyExc_RuntimeError, "conv_weight_grad: this CPU lacks AVX2 or FMA");
    Py_ssize_t onb, arb, oat, tn;
    int bad = O < 1 || A < 1 || T < 1 || R < 0 || n < 1 || B < 1 || __builtin_mul_overflow(O, n, &onb) ||
              __builtin_mul_overflow(onb, B, &onb) || __builtin_mul_overflow(A, R, &arb) ||
              __builtin_mul_overflow(arb, B, &arb) || __builtin_mul_overflow(O, A, &oat) ||
              __builtin_mul_overflow(oat, T, &oat) || __builtin_mul_overflow(T, n, &tn);
    bad = bad || c_g != onb || c_h != arb || c_gw != oat || c_idx != tn || (p_gb && c_gb != O) || !p_gw || !p_g ||
          !p_h || !p_idx;
    if (bad)
        return PyErr_Format(PyExc_ValueError,
                            "conv_weight_grad: sizes that do not fit the tensors (O %zd, A %zd, T %zd, R %zd, n %zd, "
                            "B %zd; entries: gw %zd, gb %zd, g %zd, h %zd, idx %zd)",
                            O, A, T, R, n, B, c_gw, c_gb, c_g, c_h, c_idx);
    /* tiles of at least 8 sites, at most 64 tiles: set by n alone */
    Py_ssize_t K = A * T, ntiles = n / 8 < 1 ? 1 : n / 8 > 64 ? 64 : n / 8;
    float *part = calloc((size_t)(ntiles * O * (K + 1) + 2 * B + 16), sizeof(float));
    if (!part)
        return PyErr_NoMemory();
    float *zeros = part + ntiles * O * (K + 1), *ones = zeros + B + 8;
    for (Py_ssize_t b = 0; b < B; b++)
        ones[b] = 1.0f;
    conv_job jobs[64];
    int nj = conv_threads((double)O * (K + 1) * n * B, nthreads, ntiles);
    for (int i = 0; i < nj; i++) {
        conv_job j = {NULL, part, (const float *)(uintptr_t)p_h, NULL, NULL, NULL, (const float *)(uintptr_t)p_g,
                      zeros, ones, (const int64_t *)(uintptr_t)p_idx, O, A, T, R, n, B, zero_row, 0, 0,
                      i * ntiles / nj, (i + 1) * ntiles / nj, ntiles, 0.0f, 0, 0, 0, 0};
        jobs[i] = j;
    }
    Py_BEGIN_ALLOW_THREADS
    run_jobs(wgrad_work, jobs, nj);
    for (int i = 0; i < nj; i++)
        bad |= jobs[i].bad;
    if (!bad) {
        float *gw = (float *)(uintptr_t)p_gw, *gb = (float *)(uintptr_t)p_gb;
        for (Py_ssize_t o = 0; o < O; o++)
            for (Py_ssize_t k = 0; k <= K; k++) {
                float sum = 0.0f;
                for (Py_ssize_t tile = 0; tile < ntiles; tile++)
                    sum += part[(tile * O + o) * (K + 1) + k];
                if (k < K)
                    gw[o * K + k] = sum;
                else if (gb)
                    gb[o] = sum;
            }
    }
    Py_END_ALLOW_THREADS
    free(part);
    if (bad & 2)
        return PyErr_NoMemory();
    if (bad)
        return PyErr_Format(PyExc_IndexError, "conv_weight_grad: a row index outside 0 .. %zd (and not %zd)", R - 1,
                            zero_row);
    Py_RETURN_NONE;
}

static int have_conv(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
#define HAVE_CONV 0
static int have_conv(void) { return 0; }
#endif

/* ------------------------------------------------------------------ module */

static PyMethodDef compiled_methods[] = {
    {"swap_copy", k_swap_copy, METH_VARARGS,
     "swap_copy(src, dst, word, swap) -> bool: copy src into dst (equal sizes), byte swapping each word of "
     "`word` (4 or 8) bytes when `swap`; True when every word, read as a float of that size, is finite."},
    {"copy_blocks", k_copy_blocks, METH_VARARGS,
     "copy_blocks(packed, placed, offsets, unit, count, pstride, ostride, gather): block i (unit bytes) of "
     "group t at packed[i * unit + t * pstride] and at placed[offsets[i] + t * ostride] (offsets: int64 "
     "bytes); copies packed -> placed when `gather`, else placed -> packed."},
    {"sun_deviation", k_sun_deviation, METH_VARARGS,
     "sun_deviation(values, n) -> (unit, det): max |U U^+ - 1| (entries) and max |det U - 1| over the "
     "C-contiguous complex128 N x N matrices in `values` (N = 2, 3); a NaN term counts as 0."},
    {"xor_sites", k_xor_sites, METH_VARARGS,
     "xor_sites(data, acc, site_bytes, first_site): XOR site i of `data` into row (first_site + i) mod "
     "rows of the accumulator `acc` (rows of site_bytes bytes): the SciDAC checksum's reduction."},
    {"crc32", k_crc32, METH_VARARGS,
     "crc32(data, value=0, word=0) -> int, or (int, bool) when word is 4 or 8: zlib's CRC-32 of the bytes "
     "of `data` continuing from `value` (carry-less products when the CPU has PCLMULQDQ: fast_crc32), "
     "and whether no `word`-byte word, read as a float, is a NaN or an Inf (same pass)."},
#if HAVE_CONV
    {"conv_gather", k_conv_gather, METH_VARARGS,
     "conv_gather(out, h, w, bias, idx, gate, Q, A, T, R, n, B, zero_row, sq, sa, st, slope, mode, nthreads): "
     "a gathered convolution of float32 (channels, rows, batch) tensors given by address; see the C file. "
     "Called by flowplug.compiled.conv_gather, which checks the tensors."},
    {"conv_weight_grad", k_conv_weight_grad, METH_VARARGS,
     "conv_weight_grad(gw, gb, g, h, idx, O, A, T, R, n, B, zero_row, nthreads): the weight and bias "
     "gradients of conv_gather; called by flowplug.compiled.conv_weight_grad, which checks the tensors."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef compiled_module = {
    PyModuleDef_HEAD_INIT, "flowplug._compiled",
    "Compiled inner loops of flowplug's readers and writers (see flowplug.compiled).", -1, compiled_methods,
};

PyMODINIT_FUNC PyInit__compiled(void)
{
    crc_table_init();
    clmul_ok = have_clmul();
#if HAVE_CONV
    conv_ok = have_conv();
#endif
    PyObject *mod = PyModule_Create(&compiled_module);
    if (mod && (PyModule_AddIntConstant(mod, "ABI", COMPILED_ABI) < 0 || PyModule_AddIntConstant(mod, "fast_crc32", clmul_ok) < 0 ||
                PyModule_AddIntConstant(mod, "conv", have_conv()) < 0)) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
