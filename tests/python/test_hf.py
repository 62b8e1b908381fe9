"""torch tensors and the Hugging Face integration on a tiny random Llama
(no download): greedy tokens at s=0 equal the model's own cache; at s=0.5 and
0.7 every decode step's attention output matches float64 attention on the
pruned cache; bad arguments raise.  CPU always, CUDA where there is a GPU."""
import os
import unittest

try:
    import numpy as np
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    import mustafar
    from mustafar import hf
    import ref
    SKIP = None
    if int(transformers.__version__.split(".")[0]) < 5:
        SKIP = "transformers %s < 5" % transformers.__version__
except ImportError as e:
    SKIP = "torch / transformers / numpy not installed (%s)" % e.name

VERBOSE = bool(os.environ.get("MUSTAFAR_TEST_VERBOSE"))
HAS_CUDA = SKIP is None and torch.cuda.is_available()
DEVICES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def tiny_model(device, dtype, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=1024, pad_token_id=0,
                      initializer_range=0.1)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def prune_t(x, s):
    """Independent pruning of a torch fp16/bf16 tensor [..., D] (via numpy bits)."""
    bits = x.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
    return torch.from_numpy(ref.prune_bits(bits, s).view(np.int16)).view(x.dtype)


class Recorder:
    """Wraps a MustafarCache: keeps every K/V it is given, and per decode step
    and layer the query, the output and the cache's compressed/window split."""

    def __init__(self, cache):
        self.cache, self.kv, self.steps = cache, {}, []
        upd, att = cache._update, cache._decode_attention

        def _update(layer, k, v):
            kk, vv = self.kv.get(layer.layer_idx, (None, None))
            self.kv[layer.layer_idx] = (k.detach().cpu() if kk is None else torch.cat([kk, k.cpu()], 2),
                                        v.detach().cpu() if vv is None else torch.cat([vv, v.cpu()], 2))
            return upd(layer, k, v)

        def _decode(module, query, scaling):
            layer = cache.pending[0]
            out = att(module, query, scaling)
            views = [cache.mcache.sequence_view(s, layer) for s in cache.seq_ids]
            k, v = self.kv[layer]
            self.steps.append((layer, query.cpu(), out.cpu(), views, k, v, scaling))
            return out

        cache._update, cache._decode_attention = _update, _decode


@unittest.skipIf(SKIP is not None, SKIP or "")
class TestTorchTensors(unittest.TestCase):
    def test_cpu_tensors_match_numpy(self):
        rng = np.random.default_rng(0)
        k = rng.standard_normal((20, 2, 64)).astype(np.float16)
        q = rng.standard_normal((1, 4, 64)).astype(np.float16)
        outs = []
        for conv in (lambda a: a, torch.from_numpy):
            c = mustafar.Cache(1, 2, 64, num_q_heads=4, k_sparsity=0.7, v_sparsity=0.5,
                               dense_window=4, capacity_tokens=256)
            s = c.add_sequence()
            c.append(0, s, conv(k), conv(k))
            o = c.attention(0, s, conv(q))
            outs.append(np.asarray(o))
        self.assertTrue(np.array_equal(outs[0], outs[1]))
        x = torch.randn(3, 128, dtype=torch.bfloat16)
        self.assertTrue(torch.equal(mustafar.prune(x, 0.7), prune_t(x, 0.7)))
        r = mustafar.compress(x, 0.5)
        self.assertEqual((r.dtype, tuple(r.shape)), (torch.uint8, (3, 144)))
        self.assertTrue(torch.equal(mustafar.decompress(r, 128, 0.5, dtype=torch.bfloat16),
                                    prune_t(x, 0.5)))

    def test_bad_tensors(self):
        c = mustafar.Cache(1, 2, 64, num_q_heads=4, capacity_tokens=256)
        s = c.add_sequence()
        k = torch.zeros(4, 2, 64, dtype=torch.float16)
        with self.assertRaisesRegex(TypeError, "k: dtype torch.float32"):
            c.append(0, s, k.float(), k)
        with self.assertRaisesRegex(TypeError, "v: dtype bfloat16, expected float16"):
            c.append(0, s, k, k.bfloat16())
        with self.assertRaisesRegex(ValueError, "k must be contiguous"):
            c.append(0, s, torch.zeros(2, 4, 64, dtype=torch.float16).transpose(0, 1), k)
        with self.assertRaisesRegex(ValueError, "q has shape"):
            c.attention(0, s, torch.zeros(1, 2, 64, dtype=torch.float16))
        if HAS_CUDA:
            with self.assertRaisesRegex(ValueError, "k is on cuda:0 but the context is on the CPU"):
                c.append(0, s, k.cuda(), k.cuda())
        m = tiny_model("cpu", torch.float32)
        hf.enable(m)
        cache = hf.MustafarCache(m.config, max_cache_len=64)
        with self.assertRaisesRegex(TypeError, "float16 or bfloat16"):
            m.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2,
                       past_key_values=cache, do_sample=False)

    @unittest.skipUnless(HAS_CUDA, "no CUDA device")
    def test_cuda_tensors_and_stream(self):
        rng = np.random.default_rng(1)
        k = rng.standard_normal((40, 2, 64)).astype(np.float16)
        q = rng.standard_normal((1, 4, 64)).astype(np.float16)
        outs = []
        for dev in ("cpu", "cuda"):
            c = mustafar.Cache(1, 2, 64, num_q_heads=4, k_sparsity=0.7, v_sparsity=0.5,
                               dense_window=4, capacity_tokens=256, device=dev)
            s = c.add_sequence()
            c.append(0, s, torch.from_numpy(k).to(dev), torch.from_numpy(k).to(dev))
            outs.append(c.attention(0, s, torch.from_numpy(q).to(dev)).cpu().float())
        self.assertLess((outs[0] - outs[1]).abs().max().item(), 2e-3)
        x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
        self.assertTrue(torch.equal(mustafar.prune(x, 0.7).cpu(), prune_t(x, 0.7)))
        with self.assertRaisesRegex(ValueError, "16-byte aligned"):
            c.attention(0, s, torch.zeros(4 * 64 + 1, dtype=torch.float16, device="cuda")[1:].view(1, 4, 64))
        with torch.cuda.stream(torch.cuda.Stream()):
            with self.assertRaisesRegex(RuntimeError, "current stream"):
                c.attention(0, s, torch.from_numpy(q).cuda())


@unittest.skipIf(SKIP is not None, SKIP or "")
class TestGenerate(unittest.TestCase):
    def _ids(self, device, batch=2, length=24, seed=1):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, 512, (batch, length), generator=g).to(device)

    def _greedy_equal(self, device, dtype, window):
        m = tiny_model(device, dtype)
        ids = self._ids(device)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        want = m.generate(ids, **kw)
        hf.enable(m)
        cache = hf.MustafarCache(m.config, k_sparsity=0.0, v_sparsity=0.0, dense_window=window,
                                 max_cache_len=64)
        got = m.generate(ids, past_key_values=cache, **kw)
        m.set_attn_implementation("sdpa")
        self.assertTrue(torch.equal(want, got), "\n%s\n%s" % (want[:, 24:], got[:, 24:]))
        held, dense, _ = cache.kv_bytes()
        self.assertEqual(cache.mcache.sequence_length(cache.seq_ids[0], 0), 24 + 23)
        self.assertGreater(dense, 0)

    def _per_step(self, device, dtype, s, window):
        m = tiny_model(device, dtype, seed=2)
        hf.enable(m)
        cache = hf.MustafarCache(m.config, k_sparsity=s, v_sparsity=s, dense_window=window,
                                 max_cache_len=64)
        rec = Recorder(cache)
        ids = self._ids(device, seed=3)
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                   past_key_values=cache)
        m.set_attn_implementation("sdpa")
        self.assertEqual(len(rec.steps), 11 * 3)
        worst = 0.0
        for layer, q, out, views, k, v, scaling in rec.steps:
            for b, (nc, nw) in enumerate(views):
                kb = k[b].transpose(0, 1)            # [T, Hkv, D]
                vb = v[b].transpose(0, 1)
                self.assertEqual(nc + nw, kb.shape[0])
                self.assertEqual(nw, min(window, kb.shape[0]))
                kp = torch.cat([prune_t(kb[:nc], s), kb[nc:]]).double().numpy()
                vp = torch.cat([prune_t(vb[:nc], s), vb[nc:]]).double().numpy()
                r = ref.attention_f64(q[b, :, 0].double().numpy(), kp, vp, scaling)
                o = out[b, 0].double().numpy()
                worst = max(worst, np.abs(o - r).max() / np.abs(r).max())
        bound = 1e-2 if dtype == torch.bfloat16 else 2e-3
        if VERBOSE:
            print("worst %s %s s=%s: %.2e" % (device, dtype, s, worst))
        self.assertLess(worst, bound)
        held, dense, _ = cache.kv_bytes()
        self.assertLess(held, dense)

    def test_greedy_s0(self):
        for dev in DEVICES:
            for window in (0, 5):
                with self.subTest(device=dev, window=window):
                    self._greedy_equal(dev, torch.float16, window)

    def test_per_step_pruned(self):
        for dev in DEVICES:
            for dtype in (torch.float16, torch.bfloat16):
                for s in (0.5, 0.7):
                    with self.subTest(device=dev, dtype=dtype, s=s):
                        self._per_step(dev, dtype, s, window=4)

    def test_padding_rejected(self):
        m = tiny_model("cpu", torch.float16)
        hf.enable(m)
        cache = hf.MustafarCache(m.config, max_cache_len=64)
        ids = self._ids("cpu")
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        with self.assertRaisesRegex(NotImplementedError, "padded"):
            m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                       past_key_values=cache)
        m.set_attn_implementation("sdpa")

    def test_misuse_raises_before_wrong_output(self):
        ids = self._ids("cpu")
        m = tiny_model("cpu", torch.float16)                  # attention left at SDPA
        cache = hf.MustafarCache(m.config, max_cache_len=64)
        with self.assertRaisesRegex(RuntimeError, 'not "mustafar".*enable'):
            m.generate(ids, max_new_tokens=3, do_sample=False, past_key_values=cache)
        hf.enable(m)
        cache = hf.MustafarCache(m.config, max_cache_len=ids.shape[1] - 1)
        with self.assertRaisesRegex(ValueError, "exceed max_cache_len %d" % (ids.shape[1] - 1)):
            m.generate(ids, max_new_tokens=3, do_sample=False, past_key_values=cache)
        self.assertEqual(cache.kv_bytes()[0], 0)              # nothing was stored
        cache = hf.MustafarCache(m.config, max_cache_len=ids.shape[1] + 2)
        with self.assertRaisesRegex(ValueError, "exceed max_cache_len %d" % (ids.shape[1] + 2)):
            m.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=cache)
        cfg = transformers.LlamaConfig(hidden_size=640, num_attention_heads=8, head_dim=80)
        with self.assertRaisesRegex(ValueError, "head_dim 80"):
            hf.MustafarCache(cfg)
        m.set_attn_implementation("sdpa")

    def test_cache_freed_when_unreferenced(self):
        import gc
        import weakref
        m = tiny_model("cpu", torch.float16)
        hf.enable(m)
        cache = hf.MustafarCache(m.config, max_cache_len=64)
        m.generate(self._ids("cpu"), max_new_tokens=3, do_sample=False, past_key_values=cache)
        lib_cache = weakref.ref(cache.mcache)
        del cache
        gc.collect()
        self.assertIsNone(lib_cache())
        m.set_attn_implementation("sdpa")


if __name__ == "__main__":
    unittest.main()
