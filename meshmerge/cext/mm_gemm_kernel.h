/* One instantiation of the register-tiled float64 product kernel of gemm.pyx,
   included once per instruction set with these macros defined:

     MMG_SUFFIX  suffix of the function names (avx512, avx2, generic)
     MMG_TARGET  function attribute selecting the instruction set (or nothing)
     MMG_W       doubles per vector
     MMG_NV      vectors per tile row (a tile is MMG_MR x MMG_W*MMG_NV outputs)
     MMG_MR      rows per tile

   Every output keeps its accumulator in a register across a whole block of
   t-steps (stored and reloaded between blocks), and each step is one rounded
   multiply and one rounded add (no FMA: -ffp-contract=off, and none is
   requested), t ascending: out[i, j] = (...((0 + a[i,0] b[0,j]) + a[i,1] b[1,j]) ...).
   The vector width only changes how many outputs advance together, never the
   operations one output sees, so every instantiation gives the same bits. */

#define MMG_CAT2(x, y) x##_##y
#define MMG_CAT(x, y) MMG_CAT2(x, y)
#define MMG_NR (MMG_W * MMG_NV)
#define MMG_V MMG_CAT(mmg_vec, MMG_SUFFIX)

typedef double MMG_V __attribute__((vector_size(MMG_W * 8)));

/* bp[t][jj] = b(t0 + t, j0 + jj) for t < kc, jj < nc, and 0 for nc <= jj < NR;
   b(t, j) = b[t * sbt + j * sbj] (so B may be a transposed or strided view). */
MMG_TARGET static void MMG_CAT(mmg_pack, MMG_SUFFIX)(double *restrict bp, const double *b, Py_ssize_t sbt,
                                                     Py_ssize_t sbj, Py_ssize_t t0, Py_ssize_t kc,
                                                     Py_ssize_t j0, Py_ssize_t nc)
{
    const double *src = b + t0 * sbt + j0 * sbj;
    if (sbj == 1) {
        for (Py_ssize_t t = 0; t < kc; t++) {
            memcpy(bp + t * MMG_NR, src + t * sbt, (size_t)nc * sizeof(double));
            for (Py_ssize_t jj = nc; jj < MMG_NR; jj++) bp[t * MMG_NR + jj] = 0.0;
        }
        return;
    }
    /* Column by column reads B along t, its contiguous direction when B is a transpose. */
    for (Py_ssize_t jj = 0; jj < MMG_NR; jj++) {
        if (jj < nc) {
            const double *col = src + jj * sbj;
            for (Py_ssize_t t = 0; t < kc; t++) bp[t * MMG_NR + jj] = col[t * sbt];
        } else {
            for (Py_ssize_t t = 0; t < kc; t++) bp[t * MMG_NR + jj] = 0.0;
        }
    }
}

/* Rows o[0 .. mr) x columns [0, nc) of the output advance by kc t-steps:
   a(r, t) = a[r * sai + t * sat], the packed panel bp as above. first: the
   accumulators start at +0.0 (else they are reloaded from o). mr is a
   constant where this is inlined, so the unused rows cost nothing. */
static inline __attribute__((always_inline)) MMG_TARGET void
MMG_CAT(mmg_tile, MMG_SUFFIX)(const double *a, Py_ssize_t sai, Py_ssize_t sat, const double *bp,
                              Py_ssize_t kc, double *o, Py_ssize_t ldo, const int mr, Py_ssize_t nc, int first)
{
    MMG_V acc[MMG_MR][MMG_NV];
    double tmp[MMG_NR];
    for (int r = 0; r < MMG_MR; r++) {
        if (r >= mr) break;
        if (first) {
            for (int v = 0; v < MMG_NV; v++) acc[r][v] = (MMG_V){0};
        } else if (nc == MMG_NR) {
            for (int v = 0; v < MMG_NV; v++) memcpy(&acc[r][v], o + r * ldo + v * MMG_W, sizeof(MMG_V));
        } else {
            for (int jj = 0; jj < MMG_NR; jj++) tmp[jj] = jj < nc ? o[r * ldo + jj] : 0.0;
            for (int v = 0; v < MMG_NV; v++) memcpy(&acc[r][v], tmp + v * MMG_W, sizeof(MMG_V));
        }
    }
    for (Py_ssize_t t = 0; t < kc; t++) {
        const MMG_V *bt = (const MMG_V *)(bp + t * MMG_NR);
        MMG_V bv[MMG_NV];
        for (int v = 0; v < MMG_NV; v++) bv[v] = bt[v];
        for (int r = 0; r < MMG_MR; r++) {
            if (r >= mr) break;
            double ar = a[r * sai + t * sat];
            for (int v = 0; v < MMG_NV; v++) acc[r][v] = acc[r][v] + ar * bv[v];
        }
    }
    for (int r = 0; r < MMG_MR; r++) {
        if (r >= mr) break;
        if (nc == MMG_NR) {
            for (int v = 0; v < MMG_NV; v++) memcpy(o + r * ldo + v * MMG_W, &acc[r][v], sizeof(MMG_V));
        } else {
            for (int v = 0; v < MMG_NV; v++) memcpy(tmp + v * MMG_W, &acc[r][v], sizeof(MMG_V));
            memcpy(o + r * ldo, tmp, (size_t)nc * sizeof(double));
        }
    }
}

/* Output rows [r0, r1) x columns [j0, j0 + nc) (nc <= NR) of out (rows ldo apart),
   t ascending in blocks of MMG_KC steps; bp holds MMG_KC * NR doubles, 64-byte aligned. */
MMG_TARGET static void MMG_CAT(mmg_block, MMG_SUFFIX)(const double *a, Py_ssize_t sai, Py_ssize_t sat,
                                                      const double *b, Py_ssize_t sbt, Py_ssize_t sbj,
                                                      double *out, Py_ssize_t ldo, Py_ssize_t q,
                                                      Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t j0,
                                                      Py_ssize_t nc, double *bp)
{
    for (Py_ssize_t t0 = 0; t0 < q; t0 += MMG_KC) {
        Py_ssize_t kc = q - t0 < MMG_KC ? q - t0 : MMG_KC;
        MMG_CAT(mmg_pack, MMG_SUFFIX)(bp, b, sbt, sbj, t0, kc, j0, nc);
        Py_ssize_t i = r0;
        for (; i + MMG_MR <= r1; i += MMG_MR)
            MMG_CAT(mmg_tile, MMG_SUFFIX)(a + i * sai + t0 * sat, sai, sat, bp, kc, out + i * ldo + j0, ldo,
                                          MMG_MR, nc, t0 == 0);
        /* the last rows as one shorter tile (a constant height per case, so it stays in registers) */
#define MMG_REST(h)                                                                                      \
    MMG_CAT(mmg_tile, MMG_SUFFIX)(a + i * sai + t0 * sat, sai, sat, bp, kc, out + i * ldo + j0, ldo, h, nc, \
                                  t0 == 0)
        switch (r1 - i) {
        case 1: MMG_REST(1); break;
#if MMG_MR > 2
        case 2: MMG_REST(2); break;
#endif
#if MMG_MR > 3
        case 3: MMG_REST(3); break;
#endif
#if MMG_MR > 4
        case 4: MMG_REST(4); break;
#endif
#if MMG_MR > 5
        case 5: MMG_REST(5); break;
#endif
#if MMG_MR > 6
#error "add cases for taller tiles"
#endif
        default: break;
        }
#undef MMG_REST
    }
}

#undef MMG_V
#undef MMG_NR
#undef MMG_CAT
#undef MMG_CAT2
