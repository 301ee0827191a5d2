"""The DDIM schedule and step on hand-computed values and on what a real LDM checkpoint stores."""
import pytest
import torch
from safetensors import safe_open

from models import ddim


def test_schedule_equals_the_alphas_cumprod_buffer_of_an_ldm_checkpoint(tiny_file):
    with safe_open(str(tiny_file), "pt") as f:   # make_tiny writes LatentDiffusion's buffers
        stored = f.get_tensor("alphas_cumprod")
    assert torch.equal(ddim.alphas_cumprod(), stored)


def test_schedule_values():
    a = ddim.alphas_cumprod().double()
    assert a[0].item() == pytest.approx(1 - 0.00085, abs=1e-7)          # beta_0 = 0.00085
    beta_1 = ((0.00085 ** 0.5) + (0.012 ** 0.5 - 0.00085 ** 0.5) / 999) ** 2
    assert a[1].item() == pytest.approx((1 - 0.00085) * (1 - beta_1), abs=1e-7)
    assert a[-1].item() == pytest.approx(0.0046600, abs=1e-6)


def test_leading_timesteps_with_offset():
    assert ddim.timesteps(50)[:3] == [981, 961, 941] and ddim.timesteps(50)[-1] == 1
    assert ddim.timesteps(10) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert ddim.timesteps(3) == [667, 334, 1]


def test_every_step_count_from_1_to_1000():
    """The offset of 1 holds while the top step stays <= 999; 1000 steps are every level once."""
    a = ddim.alphas_cumprod()
    for n in range(1, ddim.TRAIN_STEPS + 1):
        ts = ddim.timesteps(n)
        assert len(ts) == n and len(set(ts)) == n, n
        assert all(x > y for x, y in zip(ts, ts[1:])) and 0 <= ts[-1] and ts[0] <= 999, n
        assert [t for t, _, _ in ddim.schedule(n)] == ts
    assert ddim.timesteps(1000) == list(range(999, -1, -1))
    assert ddim.timesteps(999)[:2] == [999, 998] and ddim.timesteps(999)[-1] == 1   # offset kept
    assert ddim.timesteps(1) == [1]
    assert ddim.schedule(1000)[0] == (999, a[999].item(), a[998].item())
    assert ddim.schedule(1000)[-1] == (0, a[0].item(), a[0].item())


def test_alpha_prev_ends_at_alpha_0_not_one():
    a = ddim.alphas_cumprod()
    steps = ddim.schedule(10)
    assert steps[0] == (901, a[901].item(), a[801].item())
    assert steps[-1] == (1, a[1].item(), a[0].item())    # set_alpha_to_one=False


def test_ddim_step_by_hand():
    x, eps = torch.tensor([1.0]), torch.tensor([0.5])
    a_t, a_prev = 0.25, 0.64
    x0 = (1.0 - 0.75 ** 0.5 * 0.5) / 0.5
    x_prev, pred = ddim.ddim_step(x, eps, a_t, a_prev)
    assert pred.item() == pytest.approx(x0)
    assert x_prev.item() == pytest.approx(0.8 * x0 + 0.6 * 0.5)


def test_sample_calls_denoise_and_hook_in_order():
    calls = []
    def denoise(x, t, i):
        calls.append((t, i))
        return torch.zeros_like(x)
    x = ddim.sample(denoise, torch.ones(1), ddim.schedule(2), after_step=lambda i, x: x * 1.0)
    assert calls == [(501, 0), (1, 1)]
    a = ddim.alphas_cumprod()
    assert x.item() == pytest.approx((a[0] / a[501]).sqrt().item(), rel=1e-6)   # eps = 0: x scales by sqrt ratio


def test_v_prediction_gives_back_the_noise_and_the_clean_latent():
    """x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0: to_eps(v) is eps, and
    the DDIM step's x0 from it is x0 (at a noisy and a nearly clean timestep)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in (981, 21):
        a = ddim.alphas_cumprod()[t].item()
        x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
        v = a ** 0.5 * eps - (1 - a) ** 0.5 * x0
        got = ddim.to_eps(v, x_t, t, "v_prediction")
        assert torch.allclose(got, eps, atol=1e-12)
        assert torch.allclose(ddim.ddim_step(x_t, got, a, a)[1], x0, atol=1e-10)
        assert ddim.to_eps(v, x_t, t, "epsilon") is v
    with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
        ddim.to_eps(v, x_t, 21, "sample")
