/* test_convert.h - case 1: fp16 / bf16 conversions (backend independent). */

/* Independent round-to-nearest-even of a finite |a| (double holding a float)
   to a format with mant_bits fraction bits, minimum normal exponent emin and
   overflow threshold 2^(emax+1): returns the rounded magnitude or +Inf. */
static double ref_round_mag(double a, int mant_bits, int emin, double overflow_at)
{
    int e;
    double q, m, fl, diff, r, res;
    if (a == 0.0) return 0.0;
    if (a == INFINITY) return INFINITY;
    (void)frexp(a, &e);          /* a = f * 2^e, f in [0.5, 1): floor(log2 a) = e-1 */
    e = e - 1;
    if (e < emin) e = emin;      /* subnormal range: fixed quantum */
    q = ldexp(1.0, e - mant_bits);
    m = a / q;                   /* exact: power-of-two scaling */
    fl = floor(m);
    diff = m - fl;
    r = fl;
    if (diff > 0.5 || (diff == 0.5 && fmod(fl, 2.0) != 0.0)) r = fl + 1.0;
    res = r * q;
    if (res >= overflow_at) return INFINITY;
    return res;
}
static double ref_round_f16(float f)
{
    double a = fabs((double)f), r = ref_round_mag(a, 10, -14, 65536.0);
    return (tb_f2u(f) >> 31) ? -r : r;
}
static double ref_round_bf16(float f)
{
    double a = fabs((double)f), r = ref_round_mag(a, 7, -126, ldexp(1.0, 128));
    return (tb_f2u(f) >> 31) ? -r : r;
}

/* Compares a library conversion of f with the reference: same value and,
   for zeros, the same sign.  Returns 1 when equal. */
static int conv_matches(int bf16, float f, uint16_t got)
{
    double want = bf16 ? ref_round_bf16(f) : ref_round_f16(f);
    double g = bf16 ? ref_bf16_decode(got) : ref_f16_decode(got);
    if (tb_isnand(g)) return 0;
    if (want == 0.0) return got == ((tb_f2u(f) >> 31) ? 0x8000 : 0x0000);
    return g == want;
}

static void test_f16_to_f32_exhaustive(mustafar_context *ctx)
{
    int i, bad = 0;
    (void)ctx;
    for (i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i;
        double ref = ref_f16_decode(h);
        float got = mustafar_f16_to_f32(h);
        if (tb_isnand(ref)) {
            if (!tb_isnanf(got)) { CHECK(0, "f16_to_f32(0x%04X) = %a, expected NaN", i, (double)got); bad++; }
        } else if (tb_f2u(got) != tb_f2u((float)ref)) {
            CHECK(0, "f16_to_f32(0x%04X) = %a (0x%08X), expected %a", i, (double)got,
                  (unsigned)tb_f2u(got), ref);
            bad++;
        }
    }
    CHECK(bad == 0, "%d of 65536 fp16 patterns decoded wrongly", bad);
}

static void test_bf16_to_f32_exhaustive(mustafar_context *ctx)
{
    int i, bad = 0;
    (void)ctx;
    for (i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i;
        double ref = ref_bf16_decode(h);
        float got = mustafar_bf16_to_f32(h);
        if (tb_isnand(ref)) {
            if (!tb_isnanf(got)) { CHECK(0, "bf16_to_f32(0x%04X) = %a, expected NaN", i, (double)got); bad++; }
        } else if (tb_f2u(got) != tb_f2u((float)ref)) {
            CHECK(0, "bf16_to_f32(0x%04X) = %a (0x%08X), expected %a", i, (double)got,
                  (unsigned)tb_f2u(got), ref);
            bad++;
        }
    }
    CHECK(bad == 0, "%d of 65536 bf16 patterns decoded wrongly", bad);
}

/* Every non-NaN pattern survives f32 -> 16 bit; every NaN stays a NaN;
   float NaNs whose payload sits only in the low bits (lost by truncation)
   and 0x7FFFFFFF / 0xFFFFFFFF (a rounding carry would overflow) stay NaN. */
static void test_f16_bf16_roundtrip_and_nan(mustafar_context *ctx)
{
    tb_rng r;
    int i, b, bad = 0;
    uint32_t nan_bits[80];
    int nn = 0;
    (void)ctx;
    tb_rng_for_test(&r, g_cur_test);
    for (i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i;
        double rf = ref_f16_decode(h), rb = ref_bf16_decode(h);
        if (!tb_isnand(rf)) {
            uint16_t got = mustafar_f32_to_f16((float)rf);
            if (got != h) { CHECK(0, "f32_to_f16(%a) = 0x%04X, expected 0x%04X", rf, got, i); bad++; }
        } else {
            /* the float NaN with this fp16 NaN's sign and payload */
            uint32_t u = ((uint32_t)(h >> 15) << 31) | 0x7F800000u | ((uint32_t)(h & 0x3FF) << 13);
            uint16_t got = mustafar_f32_to_f16(tb_u2f(u));
            if (!tb_is_nan16(MUSTAFAR_DTYPE_F16, got)) {
                CHECK(0, "f32_to_f16(NaN 0x%08X) = 0x%04X, not a NaN", (unsigned)u, got);
                bad++;
            }
        }
        if (!tb_isnand(rb)) {
            uint16_t got = mustafar_f32_to_bf16((float)rb);
            if (got != h) { CHECK(0, "f32_to_bf16(%a) = 0x%04X, expected 0x%04X", rb, got, i); bad++; }
        }
    }
    for (b = 0; b < 23; b++) {
        nan_bits[nn++] = 0x7F800000u | (1u << b);
        nan_bits[nn++] = 0xFF800000u | (1u << b);
    }
    nan_bits[nn++] = 0x7FFFFFFFu;
    nan_bits[nn++] = 0xFFFFFFFFu;
    nan_bits[nn++] = 0x7FC00000u;
    nan_bits[nn++] = 0x7F801FFFu;
    nan_bits[nn++] = 0x7F807FFFu;
    nan_bits[nn++] = 0x7F808000u;
    for (i = 0; i < nn; i++) {
        uint16_t a = mustafar_f32_to_f16(tb_u2f(nan_bits[i]));
        uint16_t c = mustafar_f32_to_bf16(tb_u2f(nan_bits[i]));
        CHECK(tb_is_nan16(MUSTAFAR_DTYPE_F16, a), "f32_to_f16(NaN 0x%08X) = 0x%04X, not a NaN",
              (unsigned)nan_bits[i], a);
        CHECK(tb_is_nan16(MUSTAFAR_DTYPE_BF16, c), "f32_to_bf16(NaN 0x%08X) = 0x%04X, not a NaN",
              (unsigned)nan_bits[i], c);
    }
    for (i = 0; i < 20000; i++) {
        uint32_t u = (tb_u32(&r) & 0x807FFFFFu) | 0x7F800000u;
        if (!(u & 0x7FFFFFu)) u |= 1u;
        if (!tb_is_nan16(MUSTAFAR_DTYPE_F16, mustafar_f32_to_f16(tb_u2f(u))) ||
            !tb_is_nan16(MUSTAFAR_DTYPE_BF16, mustafar_f32_to_bf16(tb_u2f(u)))) {
            CHECK(0, "random NaN 0x%08X did not convert to a NaN", (unsigned)u);
            bad++;
        }
    }
    CHECK(bad == 0, "%d round-trip / NaN failures", bad);
}

/* Exhaustive halfway cases: for every pair of adjacent finite 16-bit values
   (both signs) the float midpoint rounds to the one with an even last bit,
   one float ulp below it to the lower one, one ulp above to the upper one.
   The largest finite value's upper neighbour is Inf (0x7C00 / 0x7F80). */
static void halfway_exhaustive(int bf16)
{
    int top = bf16 ? 0x7F7F : 0x7BFF, h, sgn, bad = 0;
    for (sgn = 0; sgn < 2; sgn++) {
        for (h = 0; h <= top; h++) {
            uint16_t lo = (uint16_t)h, hi = (uint16_t)(h + 1);
            double a = bf16 ? ref_bf16_decode(lo) : ref_f16_decode(lo);
            double b = (h == top) ? (bf16 ? ldexp(1.0, 128) : 65536.0)
                                  : (bf16 ? ref_bf16_decode(hi) : ref_f16_decode(hi));
            float mid = (float)((a + b) / 2.0), below, above;
            uint16_t even = (lo & 1) ? hi : lo, got_mid, got_below, got_above;
            uint16_t sbit = (uint16_t)(sgn ? 0x8000 : 0);
            if ((double)mid != (a + b) / 2.0) { CHECK(0, "test bug: midpoint not exact"); continue; }
            if (sgn) mid = -mid;
            below = nextafterf(mid, 0.0f);
            above = nextafterf(mid, sgn ? -INFINITY : INFINITY);
            got_mid = bf16 ? mustafar_f32_to_bf16(mid) : mustafar_f32_to_f16(mid);
            got_below = bf16 ? mustafar_f32_to_bf16(below) : mustafar_f32_to_f16(below);
            got_above = bf16 ? mustafar_f32_to_bf16(above) : mustafar_f32_to_f16(above);
            if (got_mid != (uint16_t)(even | sbit)) {
                CHECK(0, "%s(%a) = 0x%04X, expected 0x%04X (tie to even)",
                      bf16 ? "f32_to_bf16" : "f32_to_f16", (double)mid, got_mid, (unsigned)(even | sbit));
                bad++;
            }
            if (got_below != (uint16_t)(lo | sbit)) {
                CHECK(0, "%s(%a) = 0x%04X, expected 0x%04X (just below a tie)",
                      bf16 ? "f32_to_bf16" : "f32_to_f16", (double)below, got_below, (unsigned)(lo | sbit));
                bad++;
            }
            if (got_above != (uint16_t)(hi | sbit)) {
                CHECK(0, "%s(%a) = 0x%04X, expected 0x%04X (just above a tie)",
                      bf16 ? "f32_to_bf16" : "f32_to_f16", (double)above, got_above, (unsigned)(hi | sbit));
                bad++;
            }
        }
    }
    CHECK(bad == 0, "%d halfway-case failures", bad);
}
static void test_f16_halfway_exhaustive(mustafar_context *ctx) { (void)ctx; halfway_exhaustive(0); }
static void test_bf16_halfway_exhaustive(mustafar_context *ctx) { (void)ctx; halfway_exhaustive(1); }

static void test_f16_bf16_special_values(mustafar_context *ctx)
{
    struct { float f; uint16_t h16, hb16; } c[32];
    int n = 0, i;
    (void)ctx;
#define TB_CASE(F, A, B) do { c[n].f = (F); c[n].h16 = (uint16_t)(A); c[n].hb16 = (uint16_t)(B); n++; } while (0)
    TB_CASE(65520.0f, 0x7C00, 0x4780);          /* fp16: tie at the top -> Inf */
    TB_CASE(65519.99f, 0x7BFF, 0x4780);         /* just below -> max finite */
    TB_CASE(-65520.0f, 0xFC00, 0xC780);
    TB_CASE(65504.0f, 0x7BFF, 0x4780);          /* bf16: 65504 rounds up to 65536 */
    TB_CASE(1.0e6f, 0x7C00, 0x4974);
    TB_CASE(INFINITY, 0x7C00, 0x7F80);
    TB_CASE(-INFINITY, 0xFC00, 0xFF80);
    TB_CASE(0.0f, 0x0000, 0x0000);
    TB_CASE(-0.0f, 0x8000, 0x8000);
    TB_CASE(1.0f, 0x3C00, 0x3F80);
    TB_CASE(-2.0f, 0xC000, 0xC000);
    TB_CASE(1.0f + 1.0f / 2048.0f, 0x3C00, 0x3F80);          /* f16 tie, even below */
    TB_CASE(1.0f + 3.0f / 2048.0f, 0x3C02, 0x3F80);          /* f16 tie, even above */
    TB_CASE(1.0f + 1.0f / 256.0f, 0x3C04, 0x3F80);           /* bf16 tie, even below */
    TB_CASE(1.0f + 3.0f / 256.0f, 0x3C0C, 0x3F82);           /* bf16 tie, even above */
    TB_CASE(5.9604644775390625e-08f, 0x0001, 0x3380);        /* 2^-24: f16 min subnormal */
    TB_CASE(2.98023223876953125e-08f, 0x0000, 0x3300);       /* 2^-25: tie -> 0 */
    TB_CASE(-2.98023223876953125e-08f, 0x8000, 0xB300);      /* -2^-25 -> -0 */
    TB_CASE(8.94069671630859375e-08f, 0x0002, 0x33C0);       /* 3*2^-25: tie -> 2 */
    TB_CASE(6.103515625e-05f, 0x0400, 0x3880);               /* 2^-14: f16 min normal */
    TB_CASE(6.1005353927612305e-05f, 0x0400, 0x3880);     /* 2^-14 - 2^-25: tie -> 0x400 */
    TB_CASE(1.0e-10f, 0x0000, 0x2EDC);
    TB_CASE(3.4028234663852886e38f, 0x7C00, 0x7F80);         /* FLT_MAX: bf16 -> Inf */
    TB_CASE(3.3895313892515355e38f, 0x7C00, 0x7F7F);         /* bf16 max finite */
    TB_CASE(9.183549615799121e-41f, 0x0000, 0x0001);         /* 2^-133: bf16 min subnormal */
    TB_CASE(4.5917748078995606e-41f, 0x0000, 0x0000);        /* 2^-134: bf16 tie -> 0 */
    TB_CASE(1.3775324423698682e-40f, 0x0000, 0x0002);        /* 3*2^-134: tie -> 2 */
    TB_CASE(1.4012984643248171e-45f, 0x0000, 0x0000);        /* 2^-149 */
    TB_CASE(1.1754943508222875e-38f, 0x0000, 0x0080);        /* FLT_MIN: bf16 min normal */
#undef TB_CASE
    for (i = 0; i < n; i++) {
        uint16_t a = mustafar_f32_to_f16(c[i].f), b = mustafar_f32_to_bf16(c[i].f);
        CHECK(a == c[i].h16, "f32_to_f16(%a) = 0x%04X, expected 0x%04X", (double)c[i].f, a, c[i].h16);
        CHECK(b == c[i].hb16, "f32_to_bf16(%a) = 0x%04X, expected 0x%04X", (double)c[i].f, b, c[i].hb16);
        /* the table must agree with the independent reference as well */
        CHECK(conv_matches(0, c[i].f, c[i].h16) && conv_matches(1, c[i].f, c[i].hb16),
              "test bug: table entry %d disagrees with the double reference", i);
    }
}

/* Millions of random floats against the double-based reference: random bit
   patterns (every exponent, subnormals, Inf) and floats concentrated in the
   fp16 range (exponents -27..17) and near the bf16 limits. */
static void test_f32_to_16_random(mustafar_context *ctx)
{
    tb_rng r;
    long i, n = g_quick ? 300000L : 3000000L;
    long bad16 = 0, badb = 0;
    (void)ctx;
    tb_rng_for_test(&r, g_cur_test);
    for (i = 0; i < n; i++) {
        uint32_t u = tb_u32(&r);
        float f;
        uint16_t a, b;
        switch (i % 3) {
        case 0: break;                                           /* any pattern */
        case 1: u = (u & 0x807FFFFFu) | ((uint32_t)(127 + tb_int(&r, -27, 17)) << 23); break;
        default: u = (u & 0x807FFFFFu) | ((uint32_t)tb_int(&r, 0, 254) << 23); break;
        }
        f = tb_u2f(u);
        if (tb_isnanf(f)) continue;
        a = mustafar_f32_to_f16(f);
        b = mustafar_f32_to_bf16(f);
        if (!conv_matches(0, f, a)) {
            bad16++;
            CHECK(0, "f32_to_f16(%a = 0x%08X) = 0x%04X, reference %a", (double)f, (unsigned)u, a,
                  ref_round_f16(f));
        }
        if (!conv_matches(1, f, b)) {
            badb++;
            CHECK(0, "f32_to_bf16(%a = 0x%08X) = 0x%04X, reference %a", (double)f, (unsigned)u, b,
                  ref_round_bf16(f));
        }
    }
    CHECK(bad16 == 0 && badb == 0, "%ld fp16 and %ld bf16 mismatches in %ld random floats", bad16,
          badb, n);
}
