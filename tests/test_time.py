"""models/time.py: the training-time distributions keep each process's objective, the features and the grids."""
import math

import pytest
import torch

from models.domains import Molecules

PROCESSES = Molecules("qm9").processes()
from models.time import TimeDistribution, time_features, time_grid


def flow_weight(t):
    return (1 - t).clamp(min=0.05).pow(-2)


def test_tilt_zero_is_the_uniform_draw_with_the_full_weight():
    times = TimeDistribution(flow_weight, 0.0)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(times.draw(u), u)
    assert torch.equal(times.loss_weight(u), flow_weight(u))


def test_full_tilt_draws_where_the_flow_weight_is_and_flattens_it():
    times = TimeDistribution(flow_weight, 1.0)
    t = times.draw(torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    # the integral of w is 19 below t = 0.95 and 20 above it, 10 of them in (0.9, 0.95]
    assert times.norm == pytest.approx(39.0, rel=1e-4)
    assert (t > 0.95).double().mean().item() == pytest.approx(20 / 39, abs=0.005)
    assert (t > 0.9).double().mean().item() == pytest.approx(30 / 39, abs=0.005)
    weight = times.loss_weight(t)
    assert torch.allclose(weight, torch.full_like(weight, 39.0), rtol=1e-4)


@pytest.mark.parametrize("tilt", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", ["flow", "interpolant"])
def test_every_tilt_estimates_the_same_objective(name, tilt):
    """E over the tilted draw of loss_weight(t) err(t) equals E over uniform t of w(t) err(t), for an err that
    varies with t as a real loss does."""
    process = PROCESSES[name](PROCESSES[name].Config(time_tilt=tilt))
    err = lambda t: (1 - t) ** 2 + 0.1 * torch.sin(7 * t) ** 2  # noqa: E731
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    exact = torch.trapezoid(process.time_weight(grid) * err(grid), grid).item()
    t = process.draw_noise(400_000, 1, torch.Generator().manual_seed(1))["t"].double()
    estimate = (process.times.loss_weight(t) * err(t)).mean().item()
    assert estimate == pytest.approx(exact, rel=0.01)


def test_tilt_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="outside"):
        TimeDistribution(flow_weight, 1.5)


def test_time_features_and_grid():
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(time_features(t, 0), t[:, None])
    f = time_features(t, 3)
    assert f.shape == (3, 7) and torch.equal(f[:, 0], t)
    assert f[1, 1:4].tolist() == pytest.approx([math.sin(math.pi * 0.25 * 2 ** k) for k in range(3)], abs=1e-6)
    assert torch.equal(time_grid(10), torch.linspace(0, 1, 11, dtype=torch.float64))
    grid = time_grid(10, 3.0)
    assert grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()
    assert grid.diff()[-1] < grid.diff()[0] / 10  # finer at the data end
