"""NumPy re-implementation of bitsandbytes' NF4 format (quantize_4bit / dequantize_4bit with nf4 and
double quantisation), written from bnb's CUDA kernels' rules, used to cross-check kiln and bnb.

Rules: absmax per block of 64 (f32); x = w * (1/absmax); code = #(NF4 midpoints m with x > m);
two codes per byte, high nibble first, odd n padded with the code of 0. Double quantisation:
offset = mean(absmax); (absmax - offset) quantised 8-bit per 256-block against the dynamic code with
bnb's binary search. bnb's CUDA build uses an approximate reciprocal; this file uses the IEEE one,
like kiln's CPU path (they differ only for values within an ulp of a midpoint).
"""
import numpy as np

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)
MIDPOINTS = ((NF4[:-1].astype(np.float64) + NF4[1:]) / 2).astype(np.float32)


def _ftz(x):
    x = np.asarray(x, dtype=np.float32)
    return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0) * np.sign(x), x).astype(np.float32)


def nf4_codes(x):
    x = np.asarray(x, dtype=np.float32)
    return (x[..., None] > MIDPOINTS).sum(-1).astype(np.uint8)  # NaN -> 0


def dynamic_index(code, x):
    """bnb's CUDA dQuantize (non-stochastic) for one value."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = np.float32(-1.0), np.float32(1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + step
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - step
        val = code[pivot]
        step >>= 1
    if upper_pivot == 255:
        upper = code[255]
    if lower_pivot == 0:
        lower = code[0]
    if x > val:
        return upper_pivot if x > np.float32((upper + val) * np.float32(0.5)) else pivot
    return lower_pivot if x < np.float32((lower + val) * np.float32(0.5)) else pivot


def _blocks(v, bs):
    n = v.size
    nb = (n + bs - 1) // bs
    pad = np.zeros(nb * bs, dtype=np.float32)
    pad[:n] = v
    valid = np.zeros(nb * bs, dtype=bool)
    valid[:n] = True
    return pad.reshape(nb, bs), valid.reshape(nb, bs)


def quantize_nf4(w, blocksize=64, double_quant=True, code8=None, offset=None):
    v = np.asarray(w, dtype=np.float32).reshape(-1)
    n = v.size
    blk, valid = _blocks(v, blocksize)
    absmax = np.where(valid, _ftz(np.abs(blk)), -np.inf).max(1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (np.float32(1) / absmax).astype(np.float32)
        x = _ftz(_ftz(blk) * inv[:, None]).reshape(-1)[: n + (n & 1)]
    q = nf4_codes(x)
    packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
    out = {"packed": packed, "absmax_f32": absmax}
    if not double_quant:
        out["absmax"] = absmax
        return out
    if offset is None:
        offset = np.float32(absmax.astype(np.float64).mean())
    out["offset"] = np.float32(offset)
    codes, nested = quantize_blockwise8((absmax - np.float32(offset)).astype(np.float32), code8, 256)
    out["absmax"], out["nested_absmax"] = codes, nested
    return out


def quantize_blockwise8(v, code, blocksize=256):
    blk, valid = _blocks(v, blocksize)
    amax = np.where(valid, _ftz(np.abs(blk)), -np.inf).max(1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (np.float32(1) / amax).astype(np.float32)
        x = _ftz(_ftz(blk) * inv[:, None]).reshape(-1)[: v.size]
    codes = np.array([dynamic_index(code, xi) for xi in x], dtype=np.uint8)
    return codes, amax


def dequantize_nf4(packed, absmax, shape, blocksize=64, nested_absmax=None, code8=None, offset=0.0):
    n = int(np.prod(shape))
    if nested_absmax is not None:
        idx = np.arange(absmax.size) // 256
        scale = (code8[absmax] * nested_absmax[idx]).astype(np.float32)
        scale = (scale + np.float32(offset)).astype(np.float32)
    else:
        scale = absmax.astype(np.float32)
    q = np.empty(packed.size * 2, dtype=np.uint8)
    q[0::2], q[1::2] = packed >> 4, packed & 0x0F
    vals = NF4[q[:n]] * scale[np.arange(n) // blocksize]
    return vals.astype(np.float32).reshape(shape)
