"""Hugging Face transformers (5.x) integration: generate on a Mustafar cache.

    from mustafar.hf import MustafarCache, enable
    enable(model)                                   # attn_implementation "mustafar"
    cache = MustafarCache(model.config, k_sparsity=0.7, v_sparsity=0.7,
                          max_cache_len=prompt_len + max_new_tokens)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=...)

Two public extension points of transformers are used:

* MustafarCache is a transformers.Cache whose layers hand every K/V they are
  given to a mustafar.Cache.  Prefill (several new tokens): the prompt's K/V
  (after RoPE) are appended, pruned and compressed beyond the dense window, and
  returned unchanged, so the prompt is attended by the model's own attention.
  Decode (one new token): the token's K/V are kept for the attention call.
* The attention function registered as "mustafar" (AttentionInterface): in a
  decode step on a MustafarCache it calls mustafar_cache_decode_step (append
  the token, attend over records and window) and returns its output; in every
  other case (prefill, no cache) it is PyTorch SDPA, as attn_implementation
  "sdpa".  Its mask function is SDPA's.

Limits: left padding (batches of prompts of different lengths) and beam
search are not supported (NotImplementedError); a sequence is prefilled once
(no chunked prefill after decoding); sliding-window layers attend the whole
cache.  Model dtype float16 or bfloat16, on CUDA or CPU.
"""
import threading

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache as _HFCache
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ._core import Cache, record_bytes

ATTN_IMPLEMENTATION = "mustafar"
_tls = threading.local()


class MustafarLayer(CacheLayerMixin):
    """One layer of a MustafarCache (the data is in the shared mustafar.Cache)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner, layer_idx):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.length = 0

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.owner._update(self, key_states, value_states)

    def get_mask_sizes(self, query_length):
        return self.length + query_length, 0

    def get_seq_length(self):
        return self.length

    def get_max_length(self):
        return -1

    def reset(self):
        raise NotImplementedError("MustafarCache cannot be reset: create a new one")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("MustafarCache does not support beam search")

    def offload(self):
        pass

    def prefetch(self):
        pass


class MustafarCache(_HFCache):
    """A transformers Cache over a mustafar.Cache (created at the first update,
    on the device and dtype of the model's K/V).

    config:        the model's config (num_hidden_layers, num_key_value_heads,
                   num_attention_heads, head_dim or hidden_size).
    k_sparsity, v_sparsity: fraction of every K / V token vector pruned.
    dense_window:  newest tokens of each sequence kept dense.
    max_cache_len: tokens per sequence the pool is sized for (prompt + new).

    The model must run attn_implementation "mustafar" (enable(model)); with any
    other the first update after the prompt's first layer raises.  The library
    cache is freed by close(), or when this object is no longer referenced.
    """

    def __init__(self, config, *, k_sparsity=0.5, v_sparsity=0.5, dense_window=32,
                 max_cache_len=4096, page_size=16, context=None):
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.num_layers = cfg.num_hidden_layers
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_q_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_q_heads
        self.k_sparsity, self.v_sparsity = float(k_sparsity), float(v_sparsity)
        self.dense_window, self.page_size = int(dense_window), int(page_size)
        self._max_len = int(max_cache_len)
        if self._max_len < 1:
            raise ValueError("max_cache_len must be at least 1, got %d" % self._max_len)
        record_bytes(self.head_dim, self.k_sparsity)   # unsupported head_dim / sparsity: raises now
        record_bytes(self.head_dim, self.v_sparsity)
        self.context = context
        self.mcache = None          # the mustafar.Cache
        self.seq_ids = None
        self.pending = None         # (layer, k, v) of the decode token, for the attention call
        self._awaiting = None       # layer index whose update no "mustafar" attention call followed yet
        super().__init__(layers=[MustafarLayer(self, i) for i in range(self.num_layers)])

    # ---- internals
    def _create(self, batch, device, dtype):
        pages = -(-self._max_len // self.page_size)
        self.mcache = Cache(self.num_layers, self.num_kv_heads, self.head_dim,
                            num_q_heads=self.num_q_heads, k_sparsity=self.k_sparsity,
                            v_sparsity=self.v_sparsity, dense_window=self.dense_window,
                            page_size=self.page_size,
                            capacity_tokens=batch * pages * self.page_size,
                            max_sequences=batch, max_sequence_length=self._max_len,
                            dtype=dtype, device=str(device), context=self.context)
        self.seq_ids = [self.mcache.add_sequence() for _ in range(batch)]

    def _update(self, layer, k, v):
        b, hkv, t, d = k.shape
        if self.mcache is None:
            if k.dtype not in (torch.float16, torch.bfloat16):
                raise TypeError("MustafarCache needs a float16 or bfloat16 model, got %s" % k.dtype)
            self._create(b, k.device, k.dtype)
        if b != len(self.seq_ids):
            raise ValueError("batch size changed from %d to %d" % (len(self.seq_ids), b))
        if self._awaiting is not None:
            # the previous update was not followed by the "mustafar" attention function:
            # a decode token would never be stored, and the model would attend to it alone
            self.pending = None
            raise RuntimeError("MustafarCache: the model's attention is not \"mustafar\" (layer %d "
                               "ran another attention function); call mustafar.hf.enable(model) "
                               "before generate" % self._awaiting)
        if layer.length + t > self._max_len:
            raise ValueError("MustafarCache: %d + %d tokens exceed max_cache_len %d; create the "
                             "cache with max_cache_len >= prompt length + max_new_tokens"
                             % (layer.length, t, self._max_len))
        if layer.length > 0 and t > 1:
            raise NotImplementedError("MustafarCache: %d new tokens after %d cached (chunked "
                                      "prefill) is not supported" % (t, layer.length))
        self._awaiting = layer.layer_idx
        _tls.cache = self
        if t == 1 and layer.length > 0:
            # decode: the attention function appends and attends in one call
            self.pending = (layer.layer_idx, k, v)
            layer.length += 1
            return k, v
        kk = k.transpose(1, 2).contiguous()          # [b, t, Hkv, D]
        vv = v.transpose(1, 2).contiguous()
        self.mcache.append(layer.layer_idx, self.seq_ids, kk, vv, [t] * b)
        layer.length += t
        return k, v                                   # the model's attention on the prompt

    def _decode_attention(self, module, query, scaling):
        layer, k, v = self.pending
        self.pending = None
        b, hq, _, d = query.shape
        q = query.reshape(b, hq, d).contiguous()
        out = torch.empty((b, 1, hq, d), dtype=query.dtype, device=query.device)
        self.mcache.decode_step(layer, self.seq_ids, k.reshape(b, -1, d).contiguous(),
                                v.reshape(b, -1, d).contiguous(), q, out, [1] * b,
                                scale=scaling or 0.0)
        return out

    # ---- user-facing
    def kv_bytes(self):
        """(bytes held, bytes of the same tokens dense, bytes reserved in the pool)."""
        if self.mcache is None:
            return 0, 0, 0
        s = self.mcache.stats()
        return s["record_bytes"], s["dense_bytes"], s["reserved_bytes"]

    def close(self):
        if self.mcache is not None:
            self.mcache.close()
            self.mcache = None

    @property
    def max_batch_size(self):
        return len(self.seq_ids) if self.seq_ids else 0

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("MustafarCache does not support beam search")

    def crop(self, max_length):
        raise NotImplementedError("MustafarCache cannot be cropped")


def _mask_is_all_visible(mask):
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


def mustafar_attention_forward(module, query, key, value, attention_mask, scaling=None,
                               dropout=0.0, **kwargs):
    """attn_implementation "mustafar": decode steps on a MustafarCache run in the
    library; everything else is SDPA."""
    cache = getattr(_tls, "cache", None)
    _tls.cache = None                # a strong reference only from the update to this call
    if cache is not None:
        cache._awaiting = None
    if (cache is not None and cache.pending is not None and query.shape[2] == 1
            and cache.pending[0] == getattr(module, "layer_idx", None)):
        if attention_mask is not None and not _mask_is_all_visible(attention_mask):
            cache.pending = None
            raise NotImplementedError("MustafarCache: padded or masked batches are not supported")
        return cache._decode_attention(module, query, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                  dropout=dropout, **kwargs)


def register():
    """Register "mustafar" with transformers' attention and mask interfaces."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, mustafar_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def enable(model):
    """Register, and switch the model to attn_implementation "mustafar"."""
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


class StepTimer:
    """A logits processor that timestamps every generated token (after a device
    synchronize): pass it in generate(logits_processor=[timer]).  The first
    stamp ends the prefill; decode_tokens_per_s() counts the steps after it."""

    def __init__(self, batch=1):
        self.batch, self.stamps = batch, []
        import time
        self._clock = time.perf_counter

    def start(self):
        self._sync()
        self.stamps = [self._clock()]

    def _sync(self):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def __call__(self, input_ids, scores):
        self._sync()
        self.stamps.append(self._clock())
        return scores

    def prefill_s(self):
        return self.stamps[1] - self.stamps[0]

    def decode_tokens_per_s(self):
        steps = len(self.stamps) - 2
        return self.batch * steps / (self.stamps[-1] - self.stamps[1]) if steps > 0 else float("nan")
