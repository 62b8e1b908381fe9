"""mustafar: Python bindings (ctypes) of mustafar.h, a compressed KV cache
with decode attention on the compressed records.

    import mustafar
    cache = mustafar.Cache(num_layers=2, num_kv_heads=8, num_q_heads=32, head_dim=128,
                           k_sparsity=0.7, v_sparsity=0.7, capacity_tokens=4096,
                           device="cuda")          # or "cpu" (torch or numpy arrays)
    s = cache.add_sequence()
    cache.append(layer, s, k, v)                   # k, v [tokens, Hkv, D]
    out = cache.decode_step(layer, s, k1, v1, q)   # q [1, Hq, D]

The shared library is found through $MUSTAFAR_LIBRARY, next to this package,
or in the repository's build/ (`make lib`).  Importing needs neither torch nor
numpy.  Hugging Face integration: mustafar.hf (needs transformers).
"""
from ._core import (Cache, Context, MustafarError, compress, decompress, default_context,
                    kept_count, library_path, prune, record_bytes, version)

__all__ = ["Cache", "Context", "MustafarError", "compress", "decompress", "default_context",
           "kept_count", "library_path", "prune", "record_bytes", "version"]
__version__ = "0.3.2"
