"""The Pairformer backbone through the triangle-attention kernel: the model's outputs and every
parameter gradient with the Triton kernels equal those with the PyTorch reference.

Its symmetries (rotation, reflection, translation, permutation, padding) are checked with every other
backbone in tests/test_gnn.py. As in tests/test_triangle_attention.py, the kernel tests run in a child
process started with TRITON_INTERPRET=1 when there is no GPU (one for all kernel test files: tests/conftest.py).
"""
import pytest
import torch

from conftest import DEVICE, kernels

import kernels.triangle_attention as ta
from models.pairformer import Pairformer, PairformerConfig


def test_kernels_in_the_interpreter(run_kernel_tests_in_interpreter):
    run_kernel_tests_in_interpreter(__file__)


def _forward_backward(model, h, pos, t, mask):
    """Outputs and the gradients of every parameter and of the positions, for one fixed scalar loss."""
    pos = pos.detach().clone().requires_grad_()
    dx, logits = model(h, pos, t, mask)
    loss = (dx * torch.linspace(-1, 1, dx.numel(), device=dx.device).view_as(dx)).sum() + logits.square().mean()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return dx.detach(), logits.detach(), pos.grad, grads


@kernels
def test_model_through_the_kernel_matches_the_reference(monkeypatch):
    torch.manual_seed(0)
    # 3 heads, not the default 4: the interpreter's cost grows with B H N, and 3 is still no other axis's size
    model = Pairformer(PairformerConfig(hidden=32, n_layers=2, tri_heads=3, tri_head_dim=16)).to(DEVICE)
    # Without this the zero-initialised coordinate head would hide everything behind dx = 0.
    torch.nn.init.normal_(model.head.weight[-1].weight, std=0.5)
    g = torch.Generator().manual_seed(1)
    B, N = 2, 7
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False  # padded atoms: fully masked pair rows in the kernel
    h = torch.randn(B, N, 5, generator=g) * mask[..., None]
    pos = torch.randn(B, N, 3, generator=g) * 1.5
    t = torch.rand(B, generator=g)
    inputs = [x.to(DEVICE) for x in (h, pos, t, mask)]

    taken = []
    dispatch = ta.backend
    monkeypatch.setattr(ta, "backend", lambda q: taken.append(dispatch(q)) or taken[-1])
    kernel = _forward_backward(model, *inputs)
    assert taken == ["triton"] * 4  # starting and ending node attention in each of the two blocks
    monkeypatch.setattr(ta, "backend", lambda q: "reference")
    reference = _forward_backward(model, *inputs)

    for name, x, y in zip(("dx", "logits", "d pos"), kernel[:3], reference[:3]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    assert kernel[0].abs().max() > 1e-3  # the comparison above is not of zeros
    for name in reference[3]:
        torch.testing.assert_close(kernel[3][name], reference[3][name], rtol=1e-4, atol=1e-5, msg=name)
    attention = [n for n in reference[3] if "tri_att" in n and n.endswith("qkv.weight")]
    assert len(attention) == 4 and all(reference[3][n].abs().max() > 0 for n in attention)


def test_config_rejects_head_dims_the_kernel_lacks():
    with pytest.raises(ValueError, match="tri_head_dim must be one of"):
        PairformerConfig(tri_head_dim=24)
    assert PairformerConfig(hidden=128).pair_dim == 64 and PairformerConfig(hidden=16).pair_dim == 16
