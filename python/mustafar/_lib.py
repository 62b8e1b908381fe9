"""ctypes declarations of the C API of mustafar.h (see its >>api section)."""
import ctypes
import os
import sys
from ctypes import (POINTER, Structure, c_char_p, c_double, c_float, c_int, c_int32, c_int64,
                    c_size_t, c_uint16, c_void_p)

STATUS_NAMES = [
    "MUSTAFAR_OK",
    "MUSTAFAR_ERROR_NULL_POINTER",
    "MUSTAFAR_ERROR_INVALID_ARGUMENT",
    "MUSTAFAR_ERROR_UNSUPPORTED_HEAD_DIM",
    "MUSTAFAR_ERROR_UNSUPPORTED_DTYPE",
    "MUSTAFAR_ERROR_INVALID_SPARSITY",
    "MUSTAFAR_ERROR_UNKNOWN_SEQUENCE",
    "MUSTAFAR_ERROR_DUPLICATE_SEQUENCE",
    "MUSTAFAR_ERROR_TOO_MANY_SEQUENCES",
    "MUSTAFAR_ERROR_SEQUENCE_TOO_LONG",
    "MUSTAFAR_ERROR_POOL_FULL",
    "MUSTAFAR_ERROR_OUT_OF_MEMORY",
    "MUSTAFAR_ERROR_BACKEND_UNAVAILABLE",
    "MUSTAFAR_ERROR_WRONG_BACKEND",
    "MUSTAFAR_ERROR_CUDA",
    "MUSTAFAR_ERROR_JIT",
]

DTYPE_F16, DTYPE_BF16 = 1, 2
BACKEND_AUTO, BACKEND_CPU, BACKEND_CUDA = 0, 1, 2


class ContextDesc(Structure):
    _fields_ = [("backend", c_int), ("cuda_device", c_int), ("cuda_stream", c_void_p),
                ("jit_cache_dir", c_char_p), ("cuda_path", c_char_p), ("disable_jit_cache", c_int),
                ("error_buffer", c_char_p), ("error_buffer_size", c_size_t),
                ("num_threads", c_int), ("parallel_for", c_void_p),
                ("parallel_for_user_data", c_void_p)]


class CacheDesc(Structure):
    _fields_ = [("num_layers", c_int), ("num_kv_heads", c_int), ("num_q_heads", c_int),
                ("head_dim", c_int), ("k_sparsity", c_float), ("v_sparsity", c_float),
                ("dense_window", c_int), ("page_size", c_int), ("capacity_tokens", c_int64),
                ("max_sequences", c_int), ("max_sequence_length", c_int), ("dtype", c_int)]


class CacheStats(Structure):
    _fields_ = [("sequences", c_int), ("pages_used", c_int64), ("pages_total", c_int64),
                ("token_vectors", c_int64), ("compressed_vectors", c_int64),
                ("record_bytes", c_int64), ("reserved_bytes", c_int64),
                ("allocated_bytes", c_int64),
                ("dense_bytes", c_int64), ("compression_ratio", c_double)]


class PagedSeq(Structure):
    _fields_ = [("row", c_int32), ("num_compressed", c_int32), ("num_window", c_int32),
                ("reserved", c_int32)]


_P = c_void_p
_SIGNATURES = {
    "mustafar_status_string": (c_char_p, [c_int]),
    "mustafar_version_string": (c_char_p, []),
    "mustafar_context_create": (c_int, [POINTER(ContextDesc), POINTER(c_void_p)]),
    "mustafar_context_destroy": (None, [_P]),
    "mustafar_context_backend": (c_int, [_P]),
    "mustafar_last_error": (c_char_p, [_P]),
    "mustafar_f16_to_f32": (c_float, [c_uint16]),
    "mustafar_f32_to_f16": (c_uint16, [c_float]),
    "mustafar_bf16_to_f32": (c_float, [c_uint16]),
    "mustafar_f32_to_bf16": (c_uint16, [c_float]),
    "mustafar_kept_count": (c_int, [c_int, c_float]),
    "mustafar_record_bytes": (c_size_t, [c_int, c_float, c_int]),
    "mustafar_prune": (c_int, [_P, c_int, c_float, c_int, _P, _P, c_size_t]),
    "mustafar_compress": (c_int, [_P, c_int, c_float, c_int, _P, _P, c_size_t]),
    "mustafar_decompress": (c_int, [_P, c_int, c_float, c_int, _P, _P, c_size_t]),
    "mustafar_cache_create": (c_int, [_P, POINTER(CacheDesc), POINTER(c_void_p)]),
    "mustafar_cache_destroy": (None, [_P]),
    "mustafar_cache_add_sequence": (c_int, [_P, POINTER(c_int)]),
    "mustafar_cache_remove_sequence": (c_int, [_P, c_int]),
    "mustafar_cache_append": (c_int, [_P, c_int, c_int, POINTER(c_int), POINTER(c_int), _P, _P]),
    "mustafar_cache_attention": (c_int, [_P, c_int, c_int, POINTER(c_int), _P, _P, c_float]),
    "mustafar_cache_decode_step": (c_int, [_P, c_int, c_int, POINTER(c_int), POINTER(c_int),
                                           _P, _P, _P, _P, c_float]),
    "mustafar_cache_sequence_length": (c_int, [_P, c_int, c_int]),
    "mustafar_cache_stats_get": (c_int, [_P, POINTER(CacheStats)]),
    "mustafar_cache_sequence_view": (c_int, [_P, c_int, c_int, POINTER(PagedSeq)]),
}


def _library_name():
    if sys.platform == "win32":
        return "mustafar.dll"
    if sys.platform == "darwin":
        return "libmustafar.dylib"
    return "libmustafar.so"


def library_candidates():
    """Where the shared library is looked for, in order."""
    here = os.path.dirname(os.path.abspath(__file__))
    name = _library_name()
    if os.environ.get("MUSTAFAR_LIBRARY"):     # explicit: only this one
        return [os.environ["MUSTAFAR_LIBRARY"]]
    out = []
    out.append(os.path.join(here, name))                                   # installed
    out.append(os.path.join(os.path.dirname(os.path.dirname(here)), "build", name))  # in place
    return out


_lib = None


def _check_struct_sizes(handle, path):
    """The ctypes mirrors must have the library's sizes (else fields are misread)."""
    size = handle.mustafar_binding_struct_size
    size.restype, size.argtypes = c_size_t, [c_int]
    for which, cls in enumerate((ContextDesc, CacheDesc, CacheStats, PagedSeq)):
        if size(which) != ctypes.sizeof(cls):
            raise OSError("mustafar: %s has a %d-byte %s; these bindings expect %d bytes (rebuild with "
                          "`make lib` from the same checkout)" % (path, size(which), cls.__name__,
                                                                  ctypes.sizeof(cls)))


def lib():
    """The loaded library (loaded on first use)."""
    global _lib
    if _lib is not None:
        return _lib
    tried = []
    for path in library_candidates():
        if not os.path.exists(path):
            tried.append(path + " (absent)")
            continue
        try:
            handle = ctypes.CDLL(path)
        except OSError as e:
            tried.append("%s (%s)" % (path, e))
            continue
        for fname, (res, args) in _SIGNATURES.items():
            f = getattr(handle, fname)
            f.restype = res
            f.argtypes = args
        _check_struct_sizes(handle, path)
        handle._mustafar_path = path
        _lib = handle
        return _lib
    raise OSError("mustafar: shared library not found; run `make lib` in the repository or set "
                  "MUSTAFAR_LIBRARY.  Tried: " + "; ".join(tried))
