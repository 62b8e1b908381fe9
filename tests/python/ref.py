"""Independent references for the tests: pruning by the rule documented in mustafar.h and
attention in float64, written with numpy only."""
import numpy as np


def magnitude_key(bits):
    """Magnitude order of fp16 / bf16 encodings: the 15 low bits."""
    return (bits.astype(np.uint16) & 0x7FFF).astype(np.int32)


def prune_bits(bits, sparsity):
    """bits: uint16 [..., D] (fp16 or bf16 encodings); keep the D - floor(s*D)
    largest magnitudes, ties to the lower channel; zero (+0) the rest."""
    d = bits.shape[-1]
    n = d - int(np.floor(sparsity * d + 1e-6))
    flat = bits.reshape(-1, d)
    order = np.argsort(-magnitude_key(flat), axis=1, kind="stable")[:, :n]
    keep = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return np.where(keep, flat, 0).astype(np.uint16).reshape(bits.shape)


def prune_f16(x, sparsity):
    return prune_bits(x.view(np.uint16), sparsity).view(np.float16)


def attention_f64(q, k, v, scale=None):
    """q [Hq, D]; k, v [T, Hkv, D] (float); returns [Hq, D] float64."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    hq, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((hq, d))
    for h in range(hq):
        g = h // (hq // hkv)
        s = k[:, g, :] @ q[h] * scale
        w = np.exp(s - s.max())
        out[h] = (w / w.sum()) @ v[:, g, :]
    return out


def bf16_bits(x):
    """float32 -> bfloat16 encodings (round to nearest even), uint16."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_to_f64(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
