"""Context, stateless operations and the Cache class over the C library.

Every call checks its arrays (type, device, dtype, shape, contiguity,
alignment) in Python, then passes their data pointers to the C function:
no copies, nothing computed here.
"""
import ctypes
import sys
import threading

from . import _lib as L

__all__ = ["MustafarError", "Context", "Cache", "default_context", "prune", "compress",
           "decompress", "kept_count", "record_bytes", "version", "library_path"]


class MustafarError(RuntimeError):
    """A call of the C library failed.  .status is the status name
    (e.g. "MUSTAFAR_ERROR_POOL_FULL"), .code its value, .message the text of
    mustafar_last_error."""

    def __init__(self, code, message, call=""):
        self.code = int(code)
        self.status = (L.STATUS_NAMES[self.code] if 0 <= self.code < len(L.STATUS_NAMES)
                       else "status %d" % self.code)
        self.message = message
        super().__init__("%s%s: %s" % (call + " failed: " if call else "", self.status, message))


def version():
    return L.lib().mustafar_version_string().decode()


def library_path():
    return L.lib()._mustafar_path


def kept_count(head_dim, sparsity):
    """Elements kept per token vector: head_dim - floor(sparsity * head_dim)."""
    n = L.lib().mustafar_kept_count(int(head_dim), float(sparsity))
    if n == 0:
        raise ValueError("head_dim %r / sparsity %r not supported" % (head_dim, sparsity))
    return n


def record_bytes(head_dim, sparsity, dtype="float16"):
    """Bytes of one compressed token vector (bitmap, kept values, padding)."""
    n = L.lib().mustafar_record_bytes(int(head_dim), float(sparsity), _dtype_code(dtype))
    if n == 0:
        raise ValueError("head_dim %r / sparsity %r not supported" % (head_dim, sparsity))
    return n


# ---- dtypes and arrays ------------------------------------------------------------

def _torch():
    return sys.modules.get("torch")


def _numpy():
    return sys.modules.get("numpy")


def _dtype_code(dtype):
    """'float16' / 'bfloat16' / torch or numpy dtype -> F16 / BF16."""
    if isinstance(dtype, int) and dtype in (L.DTYPE_F16, L.DTYPE_BF16):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name in ("float16", "half", "f16", "fp16"):
        return L.DTYPE_F16
    if name in ("bfloat16", "bf16"):
        return L.DTYPE_BF16
    raise TypeError("dtype %r not supported: use float16 or bfloat16" % (dtype,))


_DTYPE_NAMES = {L.DTYPE_F16: "float16", L.DTYPE_BF16: "bfloat16"}


class _Arr:
    """What a call needs to know of one argument array."""
    __slots__ = ("obj", "name", "ptr", "shape", "numel", "nbytes", "device", "index", "dtype",
                 "is_torch")


def _arr(x, name, *, kind="float", writable=False):
    """kind: 'float' (fp16/bf16; numpy uint16 = raw bits, dtype None) or 'bytes' (uint8)."""
    a = _Arr()
    a.obj, a.name = x, name
    torch, np = _torch(), _numpy()
    if torch is not None and isinstance(x, torch.Tensor):
        a.is_torch = True
        if kind == "bytes":
            if x.dtype != torch.uint8:
                raise TypeError("%s: expected a torch.uint8 tensor of records, got %s" % (name, x.dtype))
            a.dtype = None
        elif x.dtype == torch.float16:
            a.dtype = L.DTYPE_F16
        elif x.dtype == torch.bfloat16:
            a.dtype = L.DTYPE_BF16
        else:
            raise TypeError("%s: dtype %s not supported (torch.float16 or torch.bfloat16)"
                            % (name, x.dtype))
        if not x.is_contiguous():
            raise ValueError("%s must be contiguous (call .contiguous())" % name)
        a.device = x.device.type
        a.index = x.device.index if x.device.index is not None else 0
        if a.device not in ("cpu", "cuda"):
            raise ValueError("%s is on device %s: only cpu and cuda tensors" % (name, x.device))
        if x.requires_grad and writable:
            raise ValueError("%s requires grad: the library writes it in place" % name)
        a.ptr = x.data_ptr()
        a.shape = tuple(x.shape)
        a.numel = x.numel()
        a.nbytes = a.numel * x.element_size()
    elif np is not None and isinstance(x, np.ndarray):
        a.is_torch = False
        if kind == "bytes":
            if x.dtype != np.uint8:
                raise TypeError("%s: expected a numpy uint8 array of records, got %s" % (name, x.dtype))
            a.dtype = None
        elif x.dtype == np.float16:
            a.dtype = L.DTYPE_F16
        elif x.dtype == np.uint16:
            a.dtype = None          # raw fp16 or bf16 bits: the dtype comes from the call
        else:
            raise TypeError("%s: numpy dtype %s not supported (float16, or uint16 holding bfloat16 "
                            "bits)" % (name, x.dtype))
        if not x.flags["C_CONTIGUOUS"]:
            raise ValueError("%s must be C-contiguous (np.ascontiguousarray)" % name)
        if writable and not x.flags["WRITEABLE"]:
            raise ValueError("%s is read-only" % name)
        a.device, a.index = "cpu", 0
        a.ptr = x.ctypes.data
        a.shape = tuple(x.shape)
        a.numel = x.size
        a.nbytes = x.nbytes
    else:
        raise TypeError("%s: expected a torch.Tensor or numpy.ndarray, got %s"
                        % (name, type(x).__name__))
    return a


def _check_dtype(a, dtype):
    if a.dtype is None:
        return          # raw uint16 bits, taken as `dtype`
    if a.dtype != dtype:
        raise TypeError("%s: dtype %s, expected %s" % (a.name, _DTYPE_NAMES[a.dtype],
                                                       _DTYPE_NAMES[dtype]))


def _empty_like_shape(ref, shape, kind="float", dtype=None):
    """A new array of `shape` on ref's device and library (torch or numpy)."""
    if ref.is_torch:
        torch = _torch()
        if kind == "bytes":
            td = torch.uint8
        else:
            td = ref.obj.dtype
        return torch.empty(shape, dtype=td, device=ref.obj.device)
    np = _numpy()
    return np.empty(shape, dtype=np.uint8 if kind == "bytes" else ref.obj.dtype)


# ---- context -----------------------------------------------------------------------

_BACKENDS = {"auto": L.BACKEND_AUTO, "cpu": L.BACKEND_CPU, "cuda": L.BACKEND_CUDA}


def _current_stream(device):
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        return 0
    return int(torch.cuda.current_stream(device).cuda_stream)


class Context:
    """A mustafar_context: the backend and, for CUDA, the device and stream.

    backend: 'auto' (CUDA if usable, else CPU), 'cpu' or 'cuda'.
    stream:  CUDA only: the cudaStream_t (an int) all work is queued on; it is
             fixed for the life of the context.  None: PyTorch's current stream
             of `device` at creation (if torch is imported), else the default
             stream.  Every call with torch tensors checks that PyTorch's
             current stream is still that stream and raises otherwise: create
             one context per stream (see default_context)."""

    def __init__(self, backend="auto", device=0, stream=None, jit_cache_dir=None,
                 disable_jit_cache=False):
        if backend not in _BACKENDS:
            raise ValueError("backend must be one of %s, got %r" % (sorted(_BACKENDS), backend))
        lib = L.lib()
        self._h = None
        self.device = int(device)
        if stream is None:
            stream = _current_stream(self.device) if backend != "cpu" and _torch() else 0
        self.stream = int(stream)
        self._jit_dir = jit_cache_dir.encode() if jit_cache_dir else None
        err = ctypes.create_string_buffer(4096)
        d = L.ContextDesc(backend=_BACKENDS[backend], cuda_device=self.device,
                          cuda_stream=self.stream or None, jit_cache_dir=self._jit_dir,
                          disable_jit_cache=int(bool(disable_jit_cache)),
                          error_buffer=ctypes.cast(err, ctypes.c_char_p), error_buffer_size=4096)
        h = ctypes.c_void_p()
        st = lib.mustafar_context_create(ctypes.byref(d), ctypes.byref(h))
        if st:
            raise MustafarError(st, err.value.decode(errors="replace"), "mustafar_context_create")
        self._h = h
        self.backend = "cuda" if lib.mustafar_context_backend(h) == L.BACKEND_CUDA else "cpu"
        self.lock = threading.Lock()    # calls on one context must not run concurrently

    @property
    def handle(self):
        if self._h is None:
            raise ValueError("the context is closed")
        return self._h

    @property
    def last_error(self):
        return L.lib().mustafar_last_error(self.handle).decode(errors="replace")

    def check(self, status, call):
        if status:
            raise MustafarError(status, self.last_error, call)

    def close(self):
        if self._h is not None:
            L.lib().mustafar_context_destroy(self._h)
            self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        if self.backend == "cuda":
            return "<mustafar.Context cuda:%d stream=0x%x>" % (self.device, self.stream)
        return "<mustafar.Context cpu>"

    def check_arrays(self, *arrs):
        """Every array on this context's backend (and device, and stream)."""
        for a in arrs:
            if a is None:
                continue
            if self.backend == "cpu":
                if a.device != "cpu":
                    raise ValueError("%s is on %s:%d but the context is on the CPU backend"
                                     % (a.name, a.device, a.index))
            else:
                if a.device != "cuda" or a.index != self.device:
                    raise ValueError("%s is on %s:%d but the context is on cuda:%d"
                                     % (a.name, a.device, a.index, self.device))
                if a.ptr % 16:
                    raise ValueError("%s must be 16-byte aligned on the CUDA backend (data_ptr "
                                     "0x%x): use a fresh tensor or .clone()" % (a.name, a.ptr))
        if self.backend == "cuda" and any(a is not None and a.is_torch for a in arrs):
            cur = _current_stream(self.device)
            if cur != self.stream:
                raise RuntimeError(
                    "PyTorch's current stream on cuda:%d (0x%x) is not the stream of this "
                    "mustafar context (0x%x): the context's stream is fixed at creation; use "
                    "mustafar.default_context('cuda:%d') under the stream, or a Context(stream=...)"
                    % (self.device, cur, self.stream, self.device))


_defaults = {}
_defaults_lock = threading.Lock()


def _parse_device(device):
    s = str(device)
    if s == "cpu":
        return "cpu", 0
    if s.startswith("cuda"):
        if ":" in s:
            return "cuda", int(s.split(":")[1])
        torch = _torch()
        return "cuda", torch.cuda.current_device() if torch is not None else 0
    if s == "auto":
        return "auto", 0
    raise ValueError("device must be 'cpu', 'cuda' or 'cuda:N', got %r" % (device,))


def default_context(device="cpu"):
    """A shared Context for a device ('cpu', 'cuda', 'cuda:N'); on CUDA one per
    (device, PyTorch current stream)."""
    backend, idx = _parse_device(device)
    stream = _current_stream(idx) if backend == "cuda" else 0
    key = (backend, idx, stream)
    with _defaults_lock:
        ctx = _defaults.get(key)
        if ctx is None:
            ctx = Context(backend, device=idx, stream=stream if backend == "cuda" else None)
            _defaults[key] = ctx
        return ctx


def _context_for(context, a):
    if context is not None:
        return context
    if a.device == "cuda":
        return default_context("cuda:%d" % a.index)
    return None         # ctx NULL: host memory, CPU backend


def _handle(ctx):
    return ctx.handle if ctx is not None else None


def _fail(ctx, st, call, args):
    """Raises for status st; without a context the C library keeps no
    message, so the message is the call's arguments."""
    if ctx is not None:
        ctx.check(st, call)
    raise MustafarError(st, args, call)


# ---- stateless operations -------------------------------------------------------------

def _float_call(fname, x, sparsity, out, dtype, context, out_kind):
    xa = _arr(x, "x")
    if len(xa.shape) < 1:
        raise ValueError("x must have at least one dimension (head_dim last)")
    dt = _dtype_code(dtype) if dtype is not None else xa.dtype
    if dt is None:
        raise TypeError("x holds raw uint16 bits: pass dtype='float16' or 'bfloat16'")
    _check_dtype(xa, dt)
    d = xa.shape[-1]
    count = xa.numel // d if d else 0
    if out_kind == "bytes":
        rb = record_bytes(d, sparsity, dt)
        if out is None:
            out = _empty_like_shape(xa, xa.shape[:-1] + (rb,), "bytes")
        oa = _arr(out, "records", kind="bytes", writable=True)
        if oa.nbytes != count * rb:
            raise ValueError("records: %d bytes, expected %d token vectors x %d bytes"
                             % (oa.nbytes, count, rb))
    else:
        if out is None:
            out = _empty_like_shape(xa, xa.shape)
        oa = _arr(out, "out", writable=True)
        _check_dtype(oa, dt)
        if oa.shape != xa.shape:
            raise ValueError("out has shape %s, expected %s" % (oa.shape, xa.shape))
    ctx = _context_for(context, xa)
    if ctx is not None:
        ctx.check_arrays(xa, oa)
    elif xa.device != "cpu" or oa.device != "cpu":
        raise ValueError("x and out must be on the same device")
    fn = getattr(L.lib(), fname)
    st = fn(_handle(ctx), d, float(sparsity), dt, xa.ptr, oa.ptr, count)
    if st:
        _fail(ctx, st, fname, "head_dim %d, sparsity %g" % (d, float(sparsity)))
    return out


def prune(x, sparsity, out=None, *, dtype=None, context=None):
    """Magnitude-prune every token vector of x ([..., head_dim]) to `sparsity`;
    returns out (a new array like x unless given)."""
    return _float_call("mustafar_prune", x, sparsity, out, dtype, context, "float")


def compress(x, sparsity, out=None, *, dtype=None, context=None):
    """Prune and compress x ([..., head_dim]) into records ([..., record_bytes], uint8)."""
    return _float_call("mustafar_compress", x, sparsity, out, dtype, context, "bytes")


def decompress(records, head_dim, sparsity, out=None, *, dtype="float16", context=None):
    """Records ([..., record_bytes], uint8) back to dense token vectors [..., head_dim]."""
    ra = _arr(records, "records", kind="bytes")
    dt = _dtype_code(dtype)
    rb = record_bytes(head_dim, sparsity, dt)
    if not ra.shape or ra.shape[-1] != rb:
        raise ValueError("records: last dimension %s, expected record_bytes = %d"
                         % (ra.shape[-1] if ra.shape else "(none: a scalar)", rb))
    count = ra.numel // rb
    if out is None:
        if ra.is_torch:
            torch = _torch()
            out = torch.empty(ra.shape[:-1] + (head_dim,), device=ra.obj.device,
                              dtype=torch.float16 if dt == L.DTYPE_F16 else torch.bfloat16)
        else:
            np = _numpy()
            out = np.empty(ra.shape[:-1] + (head_dim,),
                           dtype=np.float16 if dt == L.DTYPE_F16 else np.uint16)
    oa = _arr(out, "out", writable=True)
    _check_dtype(oa, dt)
    if oa.numel != count * head_dim:
        raise ValueError("out has %d elements, expected %d" % (oa.numel, count * head_dim))
    ctx = _context_for(context, ra)
    if ctx is not None:
        ctx.check_arrays(ra, oa)
    st = L.lib().mustafar_decompress(_handle(ctx), int(head_dim), float(sparsity), dt, ra.ptr,
                                     oa.ptr, count)
    if st:
        _fail(ctx, st, "mustafar_decompress", "head_dim %d, sparsity %g" % (int(head_dim), float(sparsity)))
    return out


# ---- cache ------------------------------------------------------------------------------

def _int_array(values, name):
    try:
        vals = [int(v) for v in values]
    except TypeError:
        raise TypeError("%s must be a sequence of ints" % name)
    return (ctypes.c_int * max(len(vals), 1))(*vals), len(vals)


class Cache:
    """A mustafar_cache: paged, compressed K/V of many sequences and layers.

    Arrays are torch tensors (device 'cpu' or 'cuda[:N]') or numpy arrays
    (CPU backend), of the cache's dtype (numpy bf16: uint16 arrays of the bits),
    contiguous:
        k, v   [sum(ntokens), num_kv_heads, head_dim]   (leading dims may be split)
        q, out [nseq, num_q_heads, head_dim]
    On CUDA, work is queued on the context's stream (PyTorch's current stream
    when the cache was created), and calls check it is still current."""

    def __init__(self, num_layers, num_kv_heads, head_dim=128, *, capacity_tokens,
                 num_q_heads=None, k_sparsity=0.0, v_sparsity=0.0, dense_window=0,
                 page_size=16, max_sequences=64, max_sequence_length=0, dtype="float16",
                 device="cpu", context=None):
        self._h = None
        self.context = context if context is not None else default_context(device)
        self.dtype = _dtype_code(dtype)
        self.num_layers, self.num_kv_heads = int(num_layers), int(num_kv_heads)
        self.num_q_heads = int(num_q_heads or num_kv_heads)
        self.head_dim = int(head_dim)
        self.k_sparsity, self.v_sparsity = float(k_sparsity), float(v_sparsity)
        self.dense_window = int(dense_window)
        d = L.CacheDesc(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                        num_q_heads=self.num_q_heads, head_dim=self.head_dim,
                        k_sparsity=self.k_sparsity, v_sparsity=self.v_sparsity,
                        dense_window=self.dense_window, page_size=int(page_size),
                        capacity_tokens=int(capacity_tokens), max_sequences=int(max_sequences),
                        max_sequence_length=int(max_sequence_length), dtype=self.dtype)
        h = ctypes.c_void_p()
        with self.context.lock:
            self.context.check(L.lib().mustafar_cache_create(self.context.handle, ctypes.byref(d),
                                                             ctypes.byref(h)),
                               "mustafar_cache_create")
        self._h = h

    @property
    def handle(self):
        if self._h is None:
            raise ValueError("the cache is closed")
        return self._h

    @property
    def device(self):
        return "cpu" if self.context.backend == "cpu" else "cuda:%d" % self.context.device

    def close(self):
        if self._h is not None:
            with self.context.lock:
                L.lib().mustafar_cache_destroy(self._h)
            self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, fname, *args):
        with self.context.lock:
            st = getattr(L.lib(), fname)(self.handle, *args)
            if st:
                raise MustafarError(st, self.context.last_error, fname)

    def add_sequence(self):
        """A new empty sequence; returns its id."""
        sid = ctypes.c_int()
        self._call("mustafar_cache_add_sequence", ctypes.byref(sid))
        return sid.value

    def remove_sequence(self, seq_id):
        self._call("mustafar_cache_remove_sequence", int(seq_id))

    def sequence_length(self, seq_id, layer=0):
        n = L.lib().mustafar_cache_sequence_length(self.handle, int(seq_id), int(layer))
        if n < 0:
            raise MustafarError(L.STATUS_NAMES.index("MUSTAFAR_ERROR_UNKNOWN_SEQUENCE"),
                                "sequence %r / layer %r not in the cache" % (seq_id, layer),
                                "mustafar_cache_sequence_length")
        return n

    def sequence_view(self, seq_id, layer=0):
        """(num_compressed, num_window): positions held as records, then dense."""
        s = L.PagedSeq()
        self._call("mustafar_cache_sequence_view", int(seq_id), int(layer), ctypes.byref(s))
        return s.num_compressed, s.num_window

    def stats(self):
        s = L.CacheStats()
        self._call("mustafar_cache_stats_get", ctypes.byref(s))
        return {f: getattr(s, f) for f, _ in L.CacheStats._fields_}

    # ---- argument checks
    @staticmethod
    def _ids(seq_ids):
        if isinstance(seq_ids, int):
            seq_ids = [seq_ids]
        return _int_array(seq_ids, "seq_ids")

    def _kv(self, k, v, nseq, ntokens):
        ka, va = _arr(k, "k"), _arr(v, "v")
        for a in (ka, va):
            _check_dtype(a, self.dtype)
            if len(a.shape) < 3 or a.shape[-2:] != (self.num_kv_heads, self.head_dim):
                raise ValueError("%s has shape %s, expected [tokens, num_kv_heads=%d, head_dim=%d]"
                                 % (a.name, a.shape, self.num_kv_heads, self.head_dim))
        if ka.shape != va.shape:
            raise ValueError("k has shape %s but v has shape %s" % (ka.shape, va.shape))
        per = self.num_kv_heads * self.head_dim
        total = ka.numel // per
        if ntokens is None:
            if nseq == 0 or total % nseq:
                raise ValueError("k holds %d tokens for %d sequences: pass ntokens" % (total, nseq))
            ntokens = [total // nseq] * nseq
        nt, n = _int_array(ntokens, "ntokens")
        if n != nseq:
            raise ValueError("ntokens has %d entries for %d sequences" % (n, nseq))
        if sum(nt[:n]) != total:
            raise ValueError("k and v hold %d tokens but sum(ntokens) = %d" % (total, sum(nt[:n])))
        return ka, va, nt

    def _qo(self, q, out, nseq):
        qa = _arr(q, "q")
        _check_dtype(qa, self.dtype)
        want = nseq * self.num_q_heads * self.head_dim
        if qa.numel != want or qa.shape[-1] != self.head_dim:
            raise ValueError("q has shape %s, expected [nseq=%d, num_q_heads=%d, head_dim=%d]"
                             % (qa.shape, nseq, self.num_q_heads, self.head_dim))
        if out is None:
            out = _empty_like_shape(qa, qa.shape)
        oa = _arr(out, "out", writable=True)
        _check_dtype(oa, self.dtype)
        if oa.numel != want:
            raise ValueError("out has shape %s, expected %d elements like q" % (oa.shape, want))
        return qa, oa, out

    def _layer(self, layer):
        layer = int(layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError("layer %d outside [0, %d)" % (layer, self.num_layers))
        return layer

    # ---- operations
    def append(self, layer, seq_ids, k, v, ntokens=None):
        """Append tokens to sequences in one layer (pruned and compressed as they
        leave the dense window).  ntokens: per sequence; None: split evenly."""
        layer = self._layer(layer)
        ids, nseq = self._ids(seq_ids)
        ka, va, nt = self._kv(k, v, nseq, ntokens)
        self.context.check_arrays(ka, va)
        self._call("mustafar_cache_append", layer, nseq, ids, nt, ka.ptr, va.ptr)

    def attention(self, layer, seq_ids, q, out=None, scale=0.0):
        """Decode attention of one query token per sequence; returns out
        [nseq, num_q_heads, head_dim] (new unless given).  scale 0: 1/sqrt(D)."""
        layer = self._layer(layer)
        ids, nseq = self._ids(seq_ids)
        qa, oa, out = self._qo(q, out, nseq)
        self.context.check_arrays(qa, oa)
        self._call("mustafar_cache_attention", layer, nseq, ids, qa.ptr, oa.ptr, float(scale or 0.0))
        return out

    def decode_step(self, layer, seq_ids, k, v, q, out=None, ntokens=None, scale=0.0):
        """append(k, v) then attention(q) in one call; returns out."""
        layer = self._layer(layer)
        ids, nseq = self._ids(seq_ids)
        ka, va, nt = self._kv(k, v, nseq, ntokens)
        qa, oa, out = self._qo(q, out, nseq)
        self.context.check_arrays(ka, va, qa, oa)
        self._call("mustafar_cache_decode_step", layer, nseq, ids, nt, ka.ptr, va.ptr, qa.ptr,
                   oa.ptr, float(scale or 0.0))
        return out
