"""E(3) symmetries of the backbone, checked in float64 so a broken symmetry cannot hide in rounding."""
import pytest
import torch

from models.domains import Molecules

ARCHS = Molecules("qm9").archs()
from models.geometry import remove_mean


def random_inputs(B=3, N=9, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2:] = False
    h = torch.randn(B, N, T, generator=g, dtype=torch.float64) * mask[..., None]
    pos = remove_mean(torch.randn(B, N, 3, generator=g, dtype=torch.float64) * 1.5, mask)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    return h, pos, t, mask


def orthogonal(det_sign, seed=1):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    if torch.det(q) * det_sign < 0:
        q[:, 0] = -q[:, 0]
    return q


# Every backbone, with Fourier time features, and the GNN with its radius-graph continuous-filter layer (cutoff 2 A:
# with these random positions some pairs are inside it and some outside).
BACKBONES = [(name, {}) for name in sorted(ARCHS)] + [(name, {"time_frequencies": 3}) for name in sorted(ARCHS)] + \
    [("gnn", {"cfconv_cutoff": 2.0})]


@pytest.fixture(params=BACKBONES, ids=lambda p: p[0] + "".join(f"+{k}" for k in p[1]))
def model(request):
    torch.manual_seed(0)
    name, extra = request.param
    cls = ARCHS[name]
    return cls(cls.Config(hidden=32, n_layers=3, **extra)).double().eval()


@pytest.mark.parametrize("det_sign", [1, -1], ids=["rotation", "reflection"])
def test_equivariance(model, det_sign):
    h, pos, t, mask = random_inputs()
    q = orthogonal(det_sign)
    v, logits = model(h, pos, t, mask)
    v_rot, logits_rot = model(h, pos @ q, t, mask)
    assert torch.allclose(v @ q, v_rot, atol=1e-10)
    assert torch.allclose(logits, logits_rot, atol=1e-10)


def test_translation_invariance(model):
    h, pos, t, mask = random_inputs()
    v, logits = model(h, pos, t, mask)
    v_shift, logits_shift = model(h, pos + torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64), t, mask)
    assert torch.allclose(v, v_shift, atol=1e-10) and torch.allclose(logits, logits_shift, atol=1e-10)


def test_permutation_equivariance(model):
    h, pos, t, mask = random_inputs()
    mask[:] = True
    perm = torch.randperm(h.shape[1], generator=torch.Generator().manual_seed(5))
    v, logits = model(h, pos, t, mask)
    v_p, logits_p = model(h[:, perm], pos[:, perm], t, mask)
    assert torch.allclose(v[:, perm], v_p, atol=1e-10) and torch.allclose(logits[:, perm], logits_p, atol=1e-10)


def test_padding_invariance(model):
    """Extra padded atoms, whatever garbage they hold, change nothing for the real atoms."""
    h, pos, t, mask = random_inputs()
    v, logits = model(h, pos, t, mask)
    pad = 4
    h2 = torch.cat([h, torch.randn(h.shape[0], pad, h.shape[2], dtype=torch.float64)], 1)
    pos2 = torch.cat([pos, torch.randn(pos.shape[0], pad, 3, dtype=torch.float64) * 10], 1)
    mask2 = torch.cat([mask, torch.zeros(mask.shape[0], pad, dtype=torch.bool)], 1)
    v2, logits2 = model(h2, pos2, t, mask2)
    assert torch.allclose(v2[:, :-pad], v, atol=1e-10) and torch.allclose(logits2[:, :-pad], logits, atol=1e-10)
    assert (v2[~mask2] == 0).all() and (logits2[~mask2] == 0).all()
    assert v[mask].sum(0).abs().max() < 1e-10 or torch.allclose(remove_mean(v, mask), v, atol=1e-10)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_self_conditioned_backbone_keeps_its_symmetries_and_uses_the_estimate(name):
    """The estimate of the clean molecule moves with the input: rotated and translated (by its own shift),
    permuted and padded with garbage, it must leave the outputs equivariant / invariant as the input alone does."""
    torch.manual_seed(0)
    cls = ARCHS[name]
    model = cls(cls.Config(hidden=32, n_layers=3, self_condition=True)).double().eval()
    h, pos, t, mask = random_inputs()
    g = torch.Generator().manual_seed(9)
    estimate = {"pos": remove_mean(torch.randn(pos.shape, generator=g, dtype=torch.float64) * 1.5, mask),
                "h": torch.rand(h.shape, generator=g, dtype=torch.float64) * 0.25}
    v, logits = model(h, pos, t, mask, estimate)
    q = orthogonal(1)
    moved = {"pos": estimate["pos"] @ q + torch.tensor([1.0, 2.0, -4.0], dtype=torch.float64), "h": estimate["h"]}
    v_rot, logits_rot = model(h, pos @ q + torch.tensor([-2.0, 0.5, 1.0], dtype=torch.float64), t, mask, moved)
    assert torch.allclose(v @ q, v_rot, atol=1e-10) and torch.allclose(logits, logits_rot, atol=1e-10)

    full = torch.ones_like(mask)
    perm = torch.randperm(h.shape[1], generator=torch.Generator().manual_seed(5))
    v, logits = model(h, pos, t, full, estimate)
    v_p, logits_p = model(h[:, perm], pos[:, perm], t, full, {k: e[:, perm] for k, e in estimate.items()})
    assert torch.allclose(v[:, perm], v_p, atol=1e-10) and torch.allclose(logits[:, perm], logits_p, atol=1e-10)

    v, logits = model(h, pos, t, mask, estimate)
    pad = lambda x: torch.cat([x, torch.randn(x.shape[0], 3, *x.shape[2:], generator=g, dtype=x.dtype) * 10], 1)  # noqa: E731
    mask2 = torch.cat([mask, torch.zeros(mask.shape[0], 3, dtype=torch.bool)], 1)
    v2, logits2 = model(pad(h), pad(pos), t, mask2, {k: pad(e) for k, e in estimate.items()})
    assert torch.allclose(v2[:, :-3], v, atol=1e-10) and torch.allclose(logits2[:, :-3], logits, atol=1e-10)

    # No estimate (a sampler's first step) is another input. (The attention backbones' coordinate heads start at
    # zero output, so the logits are compared; the estimate's distances reach them through the pair features.)
    _, logits_none = model(h, pos, t, mask, None)
    _, logits_types_only = model(h, pos, t, mask, {"pos": estimate["pos"] * 0.5, "h": estimate["h"]})
    assert not torch.allclose(logits_none, logits, atol=1e-6) and not torch.allclose(logits_types_only, logits, atol=1e-6)
    plain = cls(cls.Config(hidden=32, n_layers=3)).double()
    with pytest.raises(ValueError, match="without self_condition"):
        plain(h, pos, t, mask, estimate)
