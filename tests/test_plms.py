"""PLMS (models/plms.py) against hand-computed timesteps, transfers and multistep mixes."""
import pytest
import torch

from models import ddim, plms

A = ddim.alphas_cumprod()


def test_timesteps_repeat_the_second_one():
    assert plms.timesteps(50) == [981, 961] + list(range(961, 0, -20))
    assert len(plms.timesteps(50)) == 51
    assert plms.timesteps(10) == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert plms.timesteps(2) == [501, 1, 1]
    assert plms.timesteps(1) == [1]                       # one step has no second: one call
    assert plms.timesteps(1000)[:4] == [999, 998, 998, 997] and plms.timesteps(1000)[-1] == 0


def test_schedule_moves_call_one_over_call_zeros_interval():
    s = plms.schedule(50)
    assert len(s) == 51
    assert s[0] == (981, A[981].item(), A[961].item())
    assert s[1] == (961, A[981].item(), A[961].item())   # evaluated at 961, moves 981 -> 961 again
    assert s[2] == (961, A[961].item(), A[941].item())
    assert s[-1] == (1, A[1].item(), A[0].item())        # past the end: bar-alpha_0 (set_alpha_to_one false)
    assert plms.schedule(1) == [(1, A[1].item(), A[0].item())]


def test_transfer_by_hand():
    # a = 0.25, a' = 0.64, x = 1, eps = 0.5:
    # sqrt(.64/.25) - .39 * .5 / (.25 * sqrt(.36) + sqrt(.25 * .75 * .64)) = 1.6 - .195 / .4964102 = 1.2071797
    x = plms.transfer(torch.tensor(1.0, dtype=torch.float64), 0.5, 0.25, 0.64)
    assert x.item() == pytest.approx(1.2071797, abs=1e-7)
    # ... which is the DDIM eta-0 step: x0 = (1 - sqrt(.75) * .5) / .5, x' = .8 x0 + .6 * .5
    assert ddim.ddim_step(torch.tensor(1.0, dtype=torch.float64), 0.5, 0.25, 0.64)[0].item() == pytest.approx(x.item())


def test_multistep_coefficients():
    e = [torch.tensor(float(v)) for v in (1, 2, 3, 4, 5)]
    assert plms.multistep(e[:1]).item() == 1
    assert plms.multistep(e[:2]).item() == pytest.approx((3 * 2 - 1) / 2)
    assert plms.multistep(e[:3]).item() == pytest.approx((23 * 3 - 16 * 2 + 5 * 1) / 12)
    assert plms.multistep(e[:4]).item() == pytest.approx((55 * 4 - 59 * 3 + 37 * 2 - 9 * 1) / 24)
    assert plms.multistep(e).item() == pytest.approx((55 * 5 - 59 * 4 + 37 * 3 - 9 * 2) / 24)   # the last four


def test_sample_by_hand_with_a_blend_between_calls():
    """Five steps, six calls, eps of call i = i + 1; after_step adds 1 to every update (a stand-in
    for local blending): the next call sees it, the second update still starts from x_T."""
    T = lambda x, e, t, t2: plms.transfer(x, e, A[t].item(), A[t2].item() if t2 >= 0 else A[0].item())
    seen = []

    def denoise(x, t, i):
        seen.append((t, i, x.clone()))
        return torch.full_like(x, i + 1.0)

    x_T = torch.full((1, 1), 0.3, dtype=torch.float64)
    x = plms.sample(denoise, x_T, plms.schedule(5), after_step=lambda i, x: x + 1)
    assert [(t, i) for t, i, _ in seen] == [(801, 0), (601, 1), (601, 2), (401, 3), (201, 4), (1, 5)]
    x1_provisional = T(x_T, 1, 801, 601) + 1
    x1 = T(x_T, (1 + 2) / 2, 801, 601) + 1                  # from x_T, not from the blended provisional x
    x2 = T(x1, (3 * 3 - 1) / 2, 601, 401) + 1               # eps history [e0, e2]: e1 is not stored
    x3 = T(x2, (23 * 4 - 16 * 3 + 5 * 1) / 12, 401, 201) + 1
    x4 = T(x3, (55 * 5 - 59 * 4 + 37 * 3 - 9 * 1) / 24, 201, 1) + 1
    x5 = T(x4, (55 * 6 - 59 * 5 + 37 * 4 - 9 * 3) / 24, 1, -1) + 1
    for (_, _, got), want in zip(seen, [x_T, x1_provisional, x1, x2, x3, x4]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(x, x5, rtol=0, atol=1e-12)
