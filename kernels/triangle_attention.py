"""Triangle attention (AlphaFold / Pairformer), fused in Triton, with a PyTorch reference.

Shapes (B batch, H heads, N nodes, D head dim):
    q, k, v  [B, H, N, N, D]   fp32, bf16 or fp16; D in {16, 32, 64, 128}
    bias     [B, H, N, N]      any float dtype (usually the pair-bias projection of z)
    mask     [B, N, N] bool    True = keep this key
    out      [B, H, N, N, D]   same dtype as q

Attention around the starting node: for every row i of the pair representation, query (i, j)
attends over the keys (i, k) of the same row:

    o[b,h,i,j] = sum_k softmax_k( q[b,h,i,j] . k[b,h,i,k] / sqrt(D)
                                  + bias[b,h,j,k] + (0 if mask[b,i,k] else -inf) ) v[b,h,i,k]

A query whose keys are all masked gets o = 0 and zero gradients (no NaN). Attention around the
ending node is the same op on transposed inputs: see `triangle_attention_ending`.

Public API:
    triangle_attention(q, k, v, bias, mask)            dispatches (see below)
    triangle_attention_ending(q, k, v, bias, mask)     the ending-node variant, by transposition
    triangle_attention_reference(q, k, v, bias, mask)  plain PyTorch, materialises the logits
    backend(q) -> "triton" | "reference"               which path `triangle_attention` takes

Dispatch: CUDA tensors take the Triton kernels. CPU tensors take them too when
TRITON_INTERPRET=1 (Triton's interpreter runs them with numpy; this is how the tests exercise the
kernels without a GPU), otherwise the reference. Triton reads TRITON_INTERPRET when `@triton.jit`
decorates a function, that is when triton and this module are imported, so set it before both.

The kernels follow FlashAttention-2. Each (b, h, i) is an independent attention problem with N
queries and N keys, the bias is shared by all i and the mask by all j. The forward streams over
key blocks with an online softmax, so the N^3 logits never exist in memory; it saves o and the
per-query logsumexp. The backward recomputes the probabilities block by block from that
logsumexp: one kernel for delta = rowsum(dO * O), one for dQ, one for dK and dV, and one for
dbias = sum over i of dS (see `_bwd_dbias_kernel` for why it is a separate kernel).
"""
import os

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Block sizes. On a GPU 64 x 64 tiles are the usual FlashAttention choice for D <= 64; D = 128
# halves the key tile to keep the [BLOCK, D] fp32 accumulators in registers. These defaults are
# untuned (no GPU was available when this was written). In the interpreter the cost is per
# program and per loop step, not per element, and small tiles make modest N span several blocks.
# Every entry point takes block_j / block_k to override them (the tests use 16).
# ---------------------------------------------------------------------------------------------
GPU_BLOCKS = {16: (64, 64), 32: (64, 64), 64: (64, 64), 128: (64, 32)}
INTERPRETER_BLOCKS = (32, 32)
HEAD_DIMS = (16, 32, 64, 128)  # tl.arange needs a power of two, tl.dot at least 16
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Indexing shared by the kernels. q, k, v, o, dO are contiguous [B, H, N, N, D]; the kernels see
# them as B*H*N "rows" (one per (b, h, i)), each an [N, D] matrix. lse and delta are [B*H*N, N].
#   row = (b*H + h)*N + i,  bh = row // N,  b = bh // H
#   q[row, j, :]      at row*N*D + j*D          bias[bh, j, k]  at bh*N*N + j*N + k
#   mask[b, i, k]     at (b*N + i)*N + k        lse[row, j]     at row*N + j
# Offsets are int64: B*H*N*N*D overflows int32 for large N.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b, accumulated in fp32. FP32_DOT multiplies in exact fp32 ("ieee", no TF32): used for fp32
    inputs, to match torch's default matmul, and in the interpreter for every dtype, because it
    stores bf16 as raw uint16 and its tl.dot would multiply the bit patterns (Triton issue #11584).
    16-bit values upcast to fp32 give the same products, summed in fp32, as the GPU's tensor cores."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_kernel(Q, K, V, Bias, Mask, O, LSE, H, N, scale,
                D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                FP32_DOT: tl.constexpr):
    """One program: the queries j in one block of one row (b, h, i), streaming over all keys."""
    row = tl.program_id(0).to(tl.int64)
    bh = row // N
    b = bh // H
    i = row % N
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, D)
    j_in = offs_j < N
    base = row * N * D
    q = tl.load(Q + base + offs_j[:, None] * D + offs_d[None, :], mask=j_in[:, None], other=0.0)

    # Running max m, running sum l and unnormalised output acc, all fp32.
    m = tl.full([BLOCK_J], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_J], tl.float32)
    acc = tl.zeros([BLOCK_J, D], tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < N
        # Keys past N count as masked, so the tail block needs no special case.
        keep = tl.load(Mask + (b * N + i) * N + offs_k, mask=k_in, other=0) != 0
        kk = tl.load(K + base + offs_k[:, None] * D + offs_d[None, :], mask=k_in[:, None], other=0.0)
        vv = tl.load(V + base + offs_k[:, None] * D + offs_d[None, :], mask=k_in[:, None], other=0.0)
        bias = tl.load(Bias + bh * N * N + offs_j[:, None] * N + offs_k[None, :],
                       mask=j_in[:, None] & k_in[None, :], other=0.0)
        s = _dot(q, tl.trans(kk), FP32_DOT) * scale + bias.to(tl.float32)
        s = tl.where(keep[None, :], s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, 1))
        # While every key seen so far is masked, m_new is -inf and s - m_new would be
        # (-inf) - (-inf) = NaN; shifting by 0 instead gives p = 0 and alpha = 0, as wanted.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_shift)
        p = tl.exp(s - m_shift[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, FP32_DOT)
        m = m_new

    # l >= 1 whenever one key is kept (the maximum contributes exp(0)), so l == 0 means "no keys":
    # output 0, and lse = +inf so that the backward's exp(s - lse) is 0 for every key of that query.
    empty = l == 0.0
    o = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("inf"), m + tl.log(tl.where(empty, 1.0, l)))
    tl.store(O + base + offs_j[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=j_in[:, None])
    tl.store(LSE + row * N + offs_j, lse, mask=j_in)


@triton.jit
def _bwd_delta_kernel(O, DO, Delta, N, D: tl.constexpr, BLOCK_J: tl.constexpr):
    """delta[row, j] = sum_d dO * O: the softmax backward's per-query term, computed once."""
    row = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, D)
    j_in = offs_j < N
    ptrs = row * N * D + offs_j[:, None] * D + offs_d[None, :]
    o = tl.load(O + ptrs, mask=j_in[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=j_in[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + row * N + offs_j, tl.sum(o * do, 1), mask=j_in)


@triton.jit
def _bwd_dq_kernel(Q, K, V, Bias, Mask, DO, LSE, Delta, DQ, H, N, scale,
                   D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                   FP32_DOT: tl.constexpr):
    """One program: dQ for one block of queries j of one row (b, h, i), looping over key blocks."""
    row = tl.program_id(0).to(tl.int64)
    bh = row // N
    b = bh // H
    i = row % N
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, D)
    j_in = offs_j < N
    base = row * N * D
    q = tl.load(Q + base + offs_j[:, None] * D + offs_d[None, :], mask=j_in[:, None], other=0.0)
    do = tl.load(DO + base + offs_j[:, None] * D + offs_d[None, :], mask=j_in[:, None], other=0.0)
    # Padding queries get lse = +inf, hence p = 0, like queries without keys.
    lse = tl.load(LSE + row * N + offs_j, mask=j_in, other=float("inf"))
    delta = tl.load(Delta + row * N + offs_j, mask=j_in, other=0.0)

    dq = tl.zeros([BLOCK_J, D], tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < N
        keep = tl.load(Mask + (b * N + i) * N + offs_k, mask=k_in, other=0) != 0
        kk = tl.load(K + base + offs_k[:, None] * D + offs_d[None, :], mask=k_in[:, None], other=0.0)
        vv = tl.load(V + base + offs_k[:, None] * D + offs_d[None, :], mask=k_in[:, None], other=0.0)
        bias = tl.load(Bias + bh * N * N + offs_j[:, None] * N + offs_k[None, :],
                       mask=j_in[:, None] & k_in[None, :], other=0.0)
        s = _dot(q, tl.trans(kk), FP32_DOT) * scale + bias.to(tl.float32)
        s = tl.where(keep[None, :], s, float("-inf"))
        p = tl.exp(s - lse[:, None])
        dp = _dot(do, tl.trans(vv), FP32_DOT)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kk.dtype), kk, FP32_DOT)
    tl.store(DQ + base + offs_j[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=j_in[:, None])


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, Bias, Mask, DO, LSE, Delta, DK, DV, H, N, scale,
                     D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                     FP32_DOT: tl.constexpr):
    """One program: dK and dV for one block of keys k of one row (b, h, i), looping over queries."""
    row = tl.program_id(0).to(tl.int64)
    bh = row // N
    b = bh // H
    i = row % N
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    k_in = offs_k < N
    base = row * N * D
    kk = tl.load(K + base + offs_k[:, None] * D + offs_d[None, :], mask=k_in[:, None], other=0.0)
    vv = tl.load(V + base + offs_k[:, None] * D + offs_d[None, :], mask=k_in[:, None], other=0.0)
    keep = tl.load(Mask + (b * N + i) * N + offs_k, mask=k_in, other=0) != 0

    dk = tl.zeros([BLOCK_K, D], tl.float32)
    dv = tl.zeros([BLOCK_K, D], tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_in = offs_j < N
        q = tl.load(Q + base + offs_j[:, None] * D + offs_d[None, :], mask=j_in[:, None], other=0.0)
        do = tl.load(DO + base + offs_j[:, None] * D + offs_d[None, :], mask=j_in[:, None], other=0.0)
        lse = tl.load(LSE + row * N + offs_j, mask=j_in, other=float("inf"))
        delta = tl.load(Delta + row * N + offs_j, mask=j_in, other=0.0)
        bias = tl.load(Bias + bh * N * N + offs_j[:, None] * N + offs_k[None, :],
                       mask=j_in[:, None] & k_in[None, :], other=0.0)
        s = _dot(q, tl.trans(kk), FP32_DOT) * scale + bias.to(tl.float32)
        s = tl.where(keep[None, :], s, float("-inf"))
        p = tl.exp(s - lse[:, None])  # [BLOCK_J, BLOCK_K]
        dv += _dot(tl.trans(p).to(do.dtype), do, FP32_DOT)
        dp = _dot(do, tl.trans(vv), FP32_DOT)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds).to(q.dtype), q, FP32_DOT)
    ptrs = base + offs_k[:, None] * D + offs_d[None, :]
    tl.store(DK + ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_in[:, None])
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=k_in[:, None])


@triton.jit
def _bwd_dbias_kernel(Q, K, V, Bias, Mask, DO, LSE, Delta, DBias, H, N, scale,
                      D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                      FP32_DOT: tl.constexpr):
    """One program: dbias[b, h, j-block, k-block] = sum over i of dS[b, h, i, j, k].

    The bias is shared by all N rows i, so its gradient reduces dS over i, while the dQ and dK/dV
    programs each own a single i. Adding each program's dS tile into an fp32 buffer with atomics
    would reuse the dS those kernels already compute, but N programs would race on every bias
    element, the summation order (hence the result) would change from run to run, and it needs a
    zeroed fp32 scratch and a cast. Here one program owns a bias tile and loops over i, keeping the
    sum in fp32 registers: deterministic, written once in the bias dtype, at the price of
    recomputing the two small matmuls (q k^T and dO v^T) per tile, about a third more backward work.
    """
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    j_in = offs_j < N
    k_in = offs_k < N
    bias_ptrs = bh * N * N + offs_j[:, None] * N + offs_k[None, :]
    bias = tl.load(Bias + bias_ptrs, mask=j_in[:, None] & k_in[None, :], other=0.0).to(tl.float32)

    dbias = tl.zeros([BLOCK_J, BLOCK_K], tl.float32)
    for i in range(0, N):
        row = bh * N + i
        base = row * N * D
        q = tl.load(Q + base + offs_j[:, None] * D + offs_d[None, :], mask=j_in[:, None], other=0.0)
        do = tl.load(DO + base + offs_j[:, None] * D + offs_d[None, :], mask=j_in[:, None], other=0.0)
        kk = tl.load(K + base + offs_k[:, None] * D + offs_d[None, :], mask=k_in[:, None], other=0.0)
        vv = tl.load(V + base + offs_k[:, None] * D + offs_d[None, :], mask=k_in[:, None], other=0.0)
        lse = tl.load(LSE + row * N + offs_j, mask=j_in, other=float("inf"))
        delta = tl.load(Delta + row * N + offs_j, mask=j_in, other=0.0)
        keep = tl.load(Mask + (b * N + i) * N + offs_k, mask=k_in, other=0) != 0
        s = _dot(q, tl.trans(kk), FP32_DOT) * scale + bias
        s = tl.where(keep[None, :], s, float("-inf"))
        p = tl.exp(s - lse[:, None])
        dp = _dot(do, tl.trans(vv), FP32_DOT)
        dbias += p * (dp - delta[:, None])
    tl.store(DBias + bias_ptrs, dbias.to(DBias.dtype.element_ty), mask=j_in[:, None] & k_in[None, :])


# ---------------------------------------------------------------------------------------------
# Host side: launches, autograd, dispatch.
# ---------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """True when this module's kernels, and the @triton.jit helpers of triton.language they call
    (tl.zeros, tl.sum, ...), were decorated under TRITON_INTERPRET=1, so that numpy can run them.
    Triton decides when it decorates, at import: of triton itself, and of this module."""
    return all(type(f).__name__ == "InterpretedFunction" for f in (_fwd_kernel, tl.zeros))


def _launch_config(D, dtype, on_gpu, block_j=None, block_k=None) -> dict:
    """Constexprs, num_warps and num_stages of the launches for head dim D and q's dtype; each kernel takes the
    constexprs it declares. Takes no tensor so that kernels/bench.py compile can build the same
    configurations ahead of time, without a GPU."""
    if block_j is None or block_k is None:
        dj, dk = GPU_BLOCKS[D] if on_gpu else INTERPRETER_BLOCKS
        block_j, block_k = block_j or dj, block_k or dk
    for block in (block_j, block_k):
        if block < 16 or block & (block - 1):
            raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot's minimum); got {block}")
    fp32_dot = dtype == torch.float32 or _interpreted()  # see _dot
    # fp32 with D = 128 and Triton's default 3 pipeline stages, the dK/dV and dbias kernels need 185 and
    # 192 KiB of shared memory, more than an A100 has (163 KiB; kernels/bench.py compile); 2 stages fit.
    num_stages = 2 if dtype == torch.float32 and D == 128 else 3
    return dict(D=D, BLOCK_J=block_j, BLOCK_K=block_k, FP32_DOT=fp32_dot, num_warps=4 if D <= 64 else 8,
                num_stages=num_stages)


def _check(q, k, v, bias, mask):
    B, H, N, N2, D = q.shape
    if N != N2 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a shape [B, H, N, N, D]; got {q.shape}, {k.shape}, {v.shape}")
    if bias.shape != (B, H, N, N):
        raise ValueError(f"bias must be [B, H, N, N] = {(B, H, N, N)}; got {tuple(bias.shape)}")
    if mask.shape != (B, N, N) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [B, N, N] = {(B, N, N)}; got {mask.dtype} {tuple(mask.shape)}")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {HEAD_DIMS} for the Triton kernels; got {D}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")


class TriangleAttention(torch.autograd.Function):
    """Triton forward and backward. Inputs are made contiguous (the kernels index them densely);
    the mask gets no gradient. Call as TriangleAttention.apply(q, k, v, bias, mask, block_j, block_k)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, block_j=None, block_k=None):
        _check(q, k, v, bias, mask)
        q, k, v, bias = (t.contiguous() for t in (q, k, v, bias))
        mask = mask.contiguous().view(torch.uint8)  # same bytes; a plain integer pointer in Triton
        B, H, N, _, D = q.shape
        meta = _launch_config(D, q.dtype, q.is_cuda, block_j, block_k)
        o = torch.empty_like(q)
        lse = torch.empty((B * H * N, N), device=q.device, dtype=torch.float32)
        _fwd_kernel[(B * H * N, triton.cdiv(N, meta["BLOCK_J"]))](
            q, k, v, bias, mask, o, lse, H, N, D ** -0.5, **meta)
        ctx.save_for_backward(q, k, v, bias, mask, o, lse)
        ctx.blocks = (block_j, block_k)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: a clear error instead of a wrong one
    def backward(ctx, do):
        q, k, v, bias, mask, o, lse = ctx.saved_tensors
        do = do.contiguous()
        B, H, N, _, D = q.shape
        meta = _launch_config(D, q.dtype, q.is_cuda, *ctx.blocks)
        bj, bk = meta["BLOCK_J"], meta["BLOCK_K"]
        scale = D ** -0.5
        rows = B * H * N
        delta = torch.empty_like(lse)
        _bwd_delta_kernel[(rows, triton.cdiv(N, bj))](o, do, delta, N, D=D, BLOCK_J=bj, num_warps=meta["num_warps"])
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        args = (q, k, v, bias, mask, do, lse, delta)
        _bwd_dq_kernel[(rows, triton.cdiv(N, bj))](*args, dq, H, N, scale, **meta)
        _bwd_dkdv_kernel[(rows, triton.cdiv(N, bk))](*args, dk, dv, H, N, scale, **meta)
        dbias = None
        if ctx.needs_input_grad[3]:
            dbias = torch.empty_like(bias)
            _bwd_dbias_kernel[(B * H, triton.cdiv(N, bj), triton.cdiv(N, bk))](*args, dbias, H, N, scale, **meta)
        return dq, dk, dv, dbias, None, None, None


def triangle_attention_reference(q, k, v, bias, mask):
    """Plain PyTorch, same contract as `triangle_attention`; materialises the [B, H, N, N, N] logits
    and computes in the inputs' dtype. Queries without any kept key give zeros and zero gradients."""
    s = torch.einsum("bhijd,bhikd->bhijk", q, k) * q.shape[-1] ** -0.5 + bias[:, :, None]
    keep = mask[:, None, :, None, :]  # [B, 1, N(i), 1, N(k)]: the same key mask for every h and j
    s = s.masked_fill(~keep, float("-inf"))
    # Softmax of an all -inf row is NaN (and so is its gradient); give such rows finite logits,
    # then zero their probabilities. masked_fill passes no gradient to the filled entries.
    has_key = keep.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~has_key, 0.0), dim=-1) * has_key
    return torch.einsum("bhijk,bhikd->bhijd", p, v)


def backend(q) -> str:
    """Which implementation `triangle_attention` uses for q: "triton" or "reference"."""
    if q.is_cuda:
        return "triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        if not _interpreted():
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton or kernels.triangle_attention was "
                               "imported; Triton picks the interpreter when it decorates a function, at import. "
                               "Set it before importing either, or unset it to use the PyTorch reference.")
        return "triton"
    return "reference"


def triangle_attention(q, k, v, bias, mask, *, block_j=None, block_k=None):
    """Triangle attention around the starting node; shapes and formula in the module docstring.

    q, k, v [B, H, N, N, D]; bias [B, H, N, N]; mask [B, N, N] bool (True = keep) -> [B, H, N, N, D].
    block_j / block_k override the Triton tile sizes (queries / keys per block; powers of two >= 16).
    """
    if backend(q) == "triton":
        return TriangleAttention.apply(q, k, v, bias, mask, block_j, block_k)
    return triangle_attention_reference(q, k, v, bias, mask)


def triangle_attention_ending(q, k, v, bias, mask, **blocks):
    """Triangle attention around the ending node, by transposing the starting-node op:

        o[b,h,i,j] = sum_k softmax_k( q[b,h,i,j] . k[b,h,k,j] / sqrt(D)
                                      + bias[b,h,k,i] + (0 if mask[b,k,j] else -inf) ) v[b,h,k,j]

    (AlphaFold 2 Algorithm 14; bias and mask are indexed like the pair representation, untransposed).
    With x' = x swapped in its two node axes, this is triangle_attention(q', k', v', bias', mask')'.
    """
    t = lambda x: x.transpose(2, 3)  # node axes of [B, H, N, N, D] and [B, H, N, N]
    return t(triangle_attention(t(q), t(k), t(v), bias.transpose(-1, -2), mask.transpose(-1, -2), **blocks))
