"""The mustafar package on numpy arrays (CPU backend): format numbers,
prune / compress / decompress against an independent pruning, the Cache
against float64 attention on the pruned cache, and argument errors."""
import os
import re
import subprocess
import sys
import unittest

try:
    import numpy as np
except ImportError:
    np = None

import mustafar

if np is not None:
    import ref

PYDIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")


@unittest.skipIf(np is None, "numpy not installed")
class TestFormat(unittest.TestCase):
    def test_version_and_library(self):
        header = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                   "mustafar.h")).read()
        header_version = re.search(r'#define MUSTAFAR_VERSION_STRING "([^"]+)"', header).group(1)
        self.assertEqual(mustafar.version(), header_version)
        # the package's own version strings are written by hand: they must follow the header
        self.assertEqual(mustafar.__version__, header_version)
        pyproject = open(os.path.join(PYDIR, "pyproject.toml")).read()
        self.assertEqual(re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1), header_version)
        self.assertTrue(os.path.exists(mustafar.library_path()))

    def test_counts(self):
        self.assertEqual(mustafar.kept_count(128, 0.7), 39)        # 0.7*128 -> 89 pruned
        self.assertEqual(mustafar.kept_count(128, 0.5), 64)
        self.assertEqual(mustafar.record_bytes(128, 0.7), 96)
        self.assertEqual(mustafar.record_bytes(128, 0.5), 144)
        self.assertEqual(mustafar.record_bytes(128, 0.5, "bfloat16"), 144)
        with self.assertRaises(ValueError):
            mustafar.kept_count(100, 0.5)
        with self.assertRaises(ValueError):
            mustafar.record_bytes(128, 1.0)

    def test_prune_matches_reference(self):
        rng = np.random.default_rng(1)
        for d in (64, 128, 256):
            for s in (0.0, 0.5, 0.7):
                x = rng.standard_normal((33, d)).astype(np.float16)
                x[0, :8] = x[0, 8]                       # ties go to the lower channel
                y = mustafar.prune(x, s)
                self.assertTrue(np.array_equal(y.view(np.uint16),
                                               ref.prune_f16(x, s).view(np.uint16)), (d, s))
                self.assertTrue(((y != 0).sum(1) == mustafar.kept_count(d, s)).all())

    def test_prune_bf16_bits(self):
        rng = np.random.default_rng(2)
        bits = ref.bf16_bits(rng.standard_normal((17, 128)))
        y = mustafar.prune(bits, 0.7, dtype="bfloat16")
        self.assertTrue(np.array_equal(y, ref.prune_bits(bits, 0.7)))

    def test_compress_roundtrip(self):
        rng = np.random.default_rng(3)
        x = rng.standard_normal((4, 5, 128)).astype(np.float16)
        r = mustafar.compress(x, 0.7)
        self.assertEqual(r.shape, (4, 5, 96))
        self.assertEqual(r.dtype, np.uint8)
        y = mustafar.decompress(r, 128, 0.7)
        self.assertEqual(y.shape, x.shape)
        self.assertTrue(np.array_equal(y, mustafar.prune(x, 0.7)))
        out = np.empty_like(x)
        self.assertIs(mustafar.decompress(r, 128, 0.7, out), out)


def _cache(**kw):
    args = dict(num_q_heads=8, k_sparsity=0.5, v_sparsity=0.7, dense_window=8,
                capacity_tokens=1024, max_sequences=4)
    args.update(kw)
    return mustafar.Cache(2, 2, 64, **args)


@unittest.skipIf(np is None, "numpy not installed")
class TestCache(unittest.TestCase):
    def _run(self, dtype):
        rng = np.random.default_rng(4)
        ks, vs, hkv, hq, d = 0.5, 0.7, 2, 8, 64
        c = _cache(dtype=dtype, k_sparsity=ks, v_sparsity=vs)
        if dtype == "float16":
            enc = lambda a: a.astype(np.float16)                 # noqa: E731
            dec = lambda a: a.astype(np.float64)                 # noqa: E731
            pr = lambda a, s: ref.prune_f16(a, s)                # noqa: E731
        else:
            enc = ref.bf16_bits
            dec = ref.bf16_to_f64
            pr = ref.prune_bits
        seqs = [c.add_sequence(), c.add_sequence()]
        lens = [37, 20]
        hist = {}                       # (seq, layer) -> k, v lists
        for layer in range(2):
            ks_, vs_ = [], []
            for i, s in enumerate(seqs):
                k = enc(rng.standard_normal((lens[i], hkv, d)) * 2)
                v = enc(rng.standard_normal((lens[i], hkv, d)))
                hist[s, layer] = [k, v]
                ks_.append(k)
                vs_.append(v)
            c.append(layer, seqs, np.concatenate(ks_), np.concatenate(vs_), lens)
        worst = 0.0
        for step in range(12):
            for layer in range(2):
                k = enc(rng.standard_normal((2, hkv, d)) * 2)
                v = enc(rng.standard_normal((2, hkv, d)))
                q = enc(rng.standard_normal((2, hq, d)))
                out = c.decode_step(layer, seqs, k, v, q)
                self.assertEqual(out.shape, (2, hq, d))
                for i, s in enumerate(seqs):
                    kk, vv = hist[s, layer]
                    kk = hist[s, layer][0] = np.concatenate([kk, k[i:i + 1]])
                    vv = hist[s, layer][1] = np.concatenate([vv, v[i:i + 1]])
                    nc, nw = c.sequence_view(s, layer)
                    self.assertEqual(nc + nw, len(kk))
                    self.assertEqual(c.sequence_length(s, layer), len(kk))
                    kp = np.concatenate([pr(kk[:nc], ks), kk[nc:]])
                    vp = np.concatenate([pr(vv[:nc], vs), vv[nc:]])
                    r = ref.attention_f64(dec(q[i]), dec(kp), dec(vp))
                    err = np.abs(dec(out[i]) - r).max() / np.abs(r).max()
                    worst = max(worst, err)
        self.assertLess(worst, 1e-2 if dtype == "bfloat16" else 2e-3)
        st = c.stats()
        self.assertEqual(st["sequences"], 2)
        self.assertLess(st["compression_ratio"], 1.0)
        c.remove_sequence(seqs[0])
        self.assertEqual(c.stats()["sequences"], 1)
        c.close()

    def test_attention_f16(self):
        self._run("float16")

    def test_attention_bf16(self):
        self._run("bfloat16")

    def test_attention_call_matches_decode_step(self):
        rng = np.random.default_rng(5)
        c = _cache()
        s = c.add_sequence()
        k = rng.standard_normal((30, 2, 64)).astype(np.float16)
        c.append(0, s, k, k)
        q = rng.standard_normal((1, 8, 64)).astype(np.float16)
        a = c.attention(0, [s], q)
        c2 = _cache()
        s2 = c2.add_sequence()
        c2.append(0, s2, k[:29], k[:29])
        b = c2.decode_step(0, s2, k[29:], k[29:], q)
        self.assertTrue(np.array_equal(a, b))


@unittest.skipIf(np is None, "numpy not installed")
class TestErrors(unittest.TestCase):
    def setUp(self):
        self.c = _cache()
        self.s = self.c.add_sequence()
        self.k = np.zeros((4, 2, 64), np.float16)

    def assertRaisesNaming(self, exc, name, fn, *a, **kw):
        with self.assertRaises(exc) as cm:
            fn(*a, **kw)
        self.assertIn(name, str(cm.exception))

    def test_type_dtype_shape_contiguity(self):
        self.assertRaisesNaming(TypeError, "k", self.c.append, 0, self.s, [1, 2], self.k)
        self.assertRaisesNaming(TypeError, "v", self.c.append, 0, self.s, self.k,
                                self.k.astype(np.float32))
        self.assertRaisesNaming(ValueError, "k", self.c.append, 0, self.s,
                                np.zeros((4, 3, 64), np.float16), self.k)
        nc = np.zeros((2, 4, 64), np.float16).transpose(1, 0, 2)
        self.assertRaisesNaming(ValueError, "contiguous", self.c.append, 0, self.s, nc, nc)
        self.assertRaisesNaming(ValueError, "q", self.c.attention, 0, self.s,
                                np.zeros((1, 4, 64), np.float16))
        ro = np.zeros((1, 8, 64), np.float16)
        ro.flags.writeable = False
        self.assertRaisesNaming(ValueError, "out", self.c.attention, 0, self.s,
                                np.zeros((1, 8, 64), np.float16), ro)
        self.assertRaisesNaming(ValueError, "layer", self.c.append, 5, self.s, self.k, self.k)
        self.assertRaisesNaming(ValueError, "ntokens", self.c.append, 0, self.s, self.k,
                                self.k, [3])
        self.assertRaisesNaming(TypeError, "bfloat16", mustafar.prune,
                                np.zeros((1, 64), np.uint16), 0.5)

    def test_library_errors(self):
        with self.assertRaises(mustafar.MustafarError) as cm:
            self.c.append(0, [self.s, 7], np.zeros((8, 2, 64), np.float16),
                          np.zeros((8, 2, 64), np.float16))
        e = cm.exception
        self.assertEqual(e.status, "MUSTAFAR_ERROR_UNKNOWN_SEQUENCE")
        self.assertIn("seq_ids[1] = 7", e.message)
        with self.assertRaises(mustafar.MustafarError) as cm:
            _cache(k_sparsity=1.5)
        self.assertEqual(cm.exception.status, "MUSTAFAR_ERROR_INVALID_SPARSITY")
        with self.assertRaises(mustafar.MustafarError) as cm:
            self.c.append(0, self.s, np.zeros((2000, 2, 64), np.float16),
                          np.zeros((2000, 2, 64), np.float16))
        self.assertIn(cm.exception.status, ("MUSTAFAR_ERROR_POOL_FULL",
                                            "MUSTAFAR_ERROR_SEQUENCE_TOO_LONG"))
        self.assertEqual(self.c.sequence_length(self.s, 0), 0)      # left as it was
        with self.assertRaises(mustafar.MustafarError):
            self.c.remove_sequence(12)
        with self.assertRaises(mustafar.MustafarError):
            self.c.sequence_length(12)
        # a stateless call on host memory (no context): the message names the arguments
        with self.assertRaises(mustafar.MustafarError) as cm:
            mustafar.prune(np.zeros((2, 100), np.float16), 0.5)
        self.assertEqual(cm.exception.status, "MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM")
        self.assertIn("head_dim 100", cm.exception.message)

    def test_cuda_context(self):
        try:
            ctx = mustafar.Context("cuda", disable_jit_cache=True)
        except mustafar.MustafarError as e:       # no GPU: the reason, as a status and text
            self.assertEqual(e.status, "MUSTAFAR_ERROR_BACKEND_UNAVAILABLE")
            self.assertTrue(e.message)
            return
        self.assertEqual(ctx.backend, "cuda")
        c = mustafar.Cache(1, 2, 64, capacity_tokens=64, context=ctx)
        s = c.add_sequence()
        self.assertRaisesNaming(ValueError, "k is on cpu:0 but the context is on cuda",
                                c.append, 0, s, self.k, self.k)

    def test_closed(self):
        self.c.close()
        with self.assertRaises(ValueError):
            self.c.add_sequence()

    def test_import_without_torch_numpy(self):
        code = ("import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None; "
                "import mustafar; print(mustafar.record_bytes(128, 0.7))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=PYDIR))
        self.assertEqual(out.stdout.strip(), "96", out.stderr)

    def test_missing_library(self):
        code = "import mustafar; mustafar.version()"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=PYDIR,
                                      MUSTAFAR_LIBRARY="/nonexistent/libmustafar.so"))
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("MUSTAFAR_LIBRARY", out.stderr)


if __name__ == "__main__":
    unittest.main()
