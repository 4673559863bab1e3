"""Triangle attention: the Triton kernels against the PyTorch reference (forward and all gradients,
awkward sizes, fully masked rows), their precision against float64 next to the reference's own, the
ending-node helper, and the dispatch.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy). Triton reads that
variable when `@triton.jit` decorates a function, which happens when triton itself (its tl.zeros,
tl.sum, ... are jit functions too) and kernels/triangle_attention.py are imported. Setting it at the
top of this file is not enough in a full `pytest tests` run, where another test file may have
imported triton already, and it would leak: every later test's CPU calls would go through the slow
interpreter, and on a GPU host triton's own helpers would be interpreted and the compiled kernels
break. So the tests marked `kernels` run in a child process started with TRITON_INTERPRET=1, one for
all kernel test files (`test_kernels_in_the_interpreter`, tests/conftest.py), or in this process when
it has a CUDA device or was itself started with the variable set (then they use it directly).
"""
import pytest
import torch

from conftest import DEVICE, INTERPRETER, kernels

import kernels.triangle_attention as ta


def test_kernels_in_the_interpreter(run_kernel_tests_in_interpreter):
    """This file's kernel tests, run in a child process whose triton is imported in interpreter mode."""
    run_kernel_tests_in_interpreter(__file__)


def _inputs(B, H, N, D, dtype=torch.float32, seed=0):
    """Random q, k, v, bias, a mask with some fully masked rows i, and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, N, N, D, generator=g) for _ in range(4))
    bias = torch.randn(B, H, N, N, generator=g)
    mask = torch.rand(B, N, N, generator=g) < 0.7
    mask[:, :, 0] = True
    mask[0, N // 2] = False  # a row whose keys are all masked
    if B > 1 and N > 1:
        mask[1, :, N - 1] = False  # a key masked for every row
    return [t.to(DEVICE, dtype) for t in (q, k, v, bias)] + [mask.to(DEVICE), do.to(DEVICE, dtype)]


def _run(fn, q, k, v, bias, mask, do, **kw):
    """Output and gradients for q, k, v, bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    o = fn(*leaves, mask, **kw)
    return [o.detach()] + list(torch.autograd.grad(o, leaves, do))


def _float64(*ts):
    return [t.double() if t.is_floating_point() else t for t in ts]


NAMES = ("o", "dq", "dk", "dv", "dbias")


@kernels
def test_kernels_run_where_expected():
    q = torch.zeros(1, device=DEVICE)
    assert ta.backend(q) == "triton"
    assert ta._interpreted() == INTERPRETER  # kernels and triton's own helpers run by numpy (or not)


# B, H, N, D, block. Each size is here for what it adds to the others, at the smallest N that has it: in
# Triton's interpreter a case costs about B H N (N / block)^2 program steps of milliseconds each.
SHAPES = [
    (2, 1, 1, 16, 16),
    (2, 2, 7, 16, 16),    # less than a block; B and H > 1 together (the kernels index b = bh // H)
    (2, 1, 17, 16, 16),   # two blocks, the last one a single row, whose key is masked for every row of b = 1
    (1, 1, 33, 32, 16),   # three query and key blocks: a middle one, the online softmax rescaled twice
    (1, 1, 17, 64, 16),
    (1, 1, 40, 32, 32),   # blocks of 32 (the interpreter's default), a partial last one
]
if DEVICE == "cuda":  # where larger problems cost nothing: more heads and rows, and more blocks of each size
    SHAPES += [(2, 1, 33, 16, 16), (1, 2, 33, 32, 16), (1, 1, 70, 32, 32)]


@kernels
@pytest.mark.parametrize("B,H,N,D,block", SHAPES)
def test_matches_reference(B, H, N, D, block):
    q, k, v, bias, mask, do = _inputs(B, H, N, D)
    got = _run(ta.triangle_attention, q, k, v, bias, mask, do, block_j=block, block_k=block)
    want = _run(ta.triangle_attention_reference, *_float64(q, k, v, bias, mask, do))
    for name, x, y in zip(NAMES, got, want):
        assert torch.isfinite(x).all(), name
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=2e-5, msg=name)
    o, dq, dk, dv, _ = got
    empty = ~mask.any(-1)  # [B, N]: rows i without keys get zeros and zero gradients
    for x in (o, dq, dk, dv):
        assert (x.permute(0, 2, 1, 3, 4)[empty] == 0).all()


@kernels
def test_block_shapes_do_not_matter():
    """Unequal query and key tiles, and tiles larger than N."""
    q, k, v, bias, mask, do = _inputs(1, 1, 20, 16, seed=1)
    a = _run(ta.triangle_attention, q, k, v, bias, mask, do, block_j=16, block_k=32)
    b = _run(ta.triangle_attention, q, k, v, bias, mask, do, block_j=32, block_k=16)
    for name, x, y in zip(NAMES, a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_precision_against_float64(dtype):
    """As in trifast: the kernel's error against float64 is at most 3x the reference's at `dtype`."""
    q, k, v, bias, mask, do = _inputs(1, 1, 24, 32, dtype=dtype, seed=2)
    exact = _run(ta.triangle_attention_reference, *_float64(q, k, v, bias, mask, do))
    torch_ = _run(ta.triangle_attention_reference, q, k, v, bias, mask, do)
    kernel = _run(ta.triangle_attention, q, k, v, bias, mask, do, block_j=16, block_k=16)
    for name, x, t, e in zip(NAMES, kernel, torch_, exact):
        assert x.dtype == dtype
        err_kernel = (x.double() - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        assert err_kernel <= 3 * err_torch + 1e-7, f"{name}: kernel {err_kernel:.3g} vs torch {err_torch:.3g}"


def _ending_by_definition(q, k, v, bias, mask):
    """o[i,j] = sum_k softmax_k(q[i,j].k[k,j]/sqrt(D) + bias[k,i] + mask[k,j]) v[k,j], written out."""
    s = torch.einsum("bhijd,bhkjd->bhijk", q, k) * q.shape[-1] ** -0.5 + bias.transpose(-1, -2)[:, :, :, None, :]
    keep = mask.transpose(-1, -2)[:, None, None]  # [B, 1, 1, N(j), N(k)] = mask[b, k, j]
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s.masked_fill(~keep.any(-1, keepdim=True), 0.0), -1) * keep.any(-1, keepdim=True)
    return torch.einsum("bhijk,bhkjd->bhijd", p, v)


def test_ending_node_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the reference, whatever this process is
    q, k, v, bias, mask, _ = (t.cpu() for t in _float64(*_inputs(2, 2, 9, 16, seed=3)))
    torch.testing.assert_close(ta.triangle_attention_ending(q, k, v, bias, mask),
                               _ending_by_definition(q, k, v, bias, mask))


@kernels
def test_ending_node_kernels():
    """The kernels on transposed (non-contiguous) views; a bias without gradient skips dbias."""
    q, k, v, bias, mask, do = _inputs(2, 2, 9, 16, seed=3)
    want = _ending_by_definition(*_float64(q, k, v, bias), mask)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = ta.triangle_attention_ending(q, k, v, bias, mask, block_j=16, block_k=16)
    torch.testing.assert_close(o.double(), want, rtol=1e-4, atol=1e-5)
    o.backward(do)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@kernels
def test_dispatch_takes_the_kernels(monkeypatch):
    q, k, v, bias, mask, _ = _inputs(1, 1, 5, 16)
    o = ta.triangle_attention(*(t.requires_grad_() for t in (q, k, v, bias)), mask)
    assert type(o.grad_fn).__name__ == "TriangleAttentionBackward"
    torch.testing.assert_close(o, ta.triangle_attention_reference(q, k, v, bias, mask))
    with pytest.raises(ValueError, match="head dim"):
        ta.triangle_attention(*(torch.zeros(1, 1, 3, 3, 24, device=DEVICE) for _ in range(3)),
                              torch.zeros(1, 1, 3, 3, device=DEVICE), torch.ones(1, 3, 3, dtype=torch.bool, device=DEVICE))
    # The variable is read at each call: unset, CPU tensors take the reference even where the kernels were
    # decorated for the interpreter (the test below checks it where they were not).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ta.backend(q.cpu()) == "reference"


def test_dispatch_cpu_without_interpreter_is_the_reference(monkeypatch):
    *qkvb, mask, _ = (t.cpu() for t in _inputs(1, 1, 5, 16))
    q, k, v, bias = (t.requires_grad_() for t in qkvb)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ta.backend(q) == "reference"
    o = ta.triangle_attention(q, k, v, bias, mask)
    # the reference itself, bit for bit, differentiated by autograd through its einsums
    assert type(o.grad_fn).__name__ != "TriangleAttentionBackward"
    assert torch.equal(o, ta.triangle_attention_reference(q, k, v, bias, mask))
    # Setting the variable now is too late for kernels decorated at import: a clear error.
    if not ta._interpreted():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(RuntimeError, match="before importing"):
            ta.triangle_attention(q, k, v, bias, mask)
