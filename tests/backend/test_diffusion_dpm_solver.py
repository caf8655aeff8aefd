"""DPM-Solver++(2M) against a diffusion problem solved in closed form, and against DDIM-50.

The data are Gaussian, x0 ~ N(mu, Sigma), so every marginal is Gaussian, q(x_t) = N(a mu, a^2 Sigma + s^2 I)
(a = sqrt(abar_t), s = sqrt(1 - abar_t)), and the exact noise predictor is linear:
eps*(x_t, t) = s C_t^{-1} (x_t - a mu), C_t = a^2 Sigma + s^2 I. A deterministic sampler is then an affine
map x_out = M x_in + c, so its output distribution from the exact marginal at its first timestep is known
without Monte Carlo: mean M m + c, covariance M C M^T. The target is the marginal at abar_0, where the
released DDIM (and this solver) stop. What is left is each sampler's discretisation error alone.
"""

from __future__ import annotations

import pytest
import torch

from backend.diffusion.ddim import DDIMScheduler
from backend.diffusion.dpm_solver import DPMSolverMultistepScheduler, dpm_solver_timesteps
from backend.diffusion.inferer import DiffusionInferer

DIM = 4


def _problem():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.5, -0.3, 0.0, 0.8], dtype=torch.float64)
    a = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    sigma = 0.05 * a @ a.T + 0.01 * torch.eye(DIM, dtype=torch.float64)  # latent-like: small, correlated
    return mu, sigma


def _marginal(mu, sigma, abar):
    a, s2 = abar.sqrt(), 1.0 - abar
    return a * mu, a * a * sigma + s2 * torch.eye(DIM, dtype=torch.float64)


def _exact_network(mu, sigma, abar_all, prediction_type):
    def net(x, t, cond):  # x (B, 1, DIM, 1, 1) as the inferer lays latents out
        abar = abar_all[int(t[0])].to(torch.float64)
        m, c = _marginal(mu, sigma, abar)
        flat = x.reshape(x.shape[0], DIM).to(torch.float64)
        eps = (1.0 - abar).sqrt() * torch.linalg.solve(c, (flat - m).T).T
        out = eps if prediction_type == "epsilon" else (flat - (1.0 - abar).sqrt() * eps) / abar.sqrt()
        return out.reshape(x.shape).to(x.dtype)

    return net


def _output_distribution(scheduler, mu, sigma):
    """Mean and covariance of the sampler's output from the exact marginal at its first timestep."""
    abar = scheduler.alphas_cumprod.to(torch.float64)
    net = _exact_network(mu, sigma, abar, scheduler.prediction_type)
    probes = torch.cat((torch.zeros(1, DIM), torch.eye(DIM)), dim=0).to(torch.float64)  # 0, e_1, ..., e_d
    x_t = probes.reshape(DIM + 1, 1, DIM, 1, 1)
    cond = torch.zeros(DIM + 1, 0, DIM, 1, 1, dtype=torch.float64)
    out = DiffusionInferer(scheduler).sample(net, cond, noise=x_t, latent_channels=1).reshape(DIM + 1, DIM)
    c, m_lin = out[0], (out[1:] - out[0]).T  # x_out = m_lin x_in + c
    m0, c0 = _marginal(mu, sigma, abar[int(scheduler.timesteps[0])])
    return m_lin @ m0 + c, m_lin @ c0 @ m_lin.T


def _errors(scheduler, mu, sigma):
    mean, cov = _output_distribution(scheduler, mu, sigma)
    t_mean, t_cov = _marginal(mu, sigma, scheduler.alphas_cumprod.to(torch.float64)[0])
    return (mean - t_mean).abs().max().item(), (cov - t_cov).abs().max().item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_dpm_solver_10_to_20_steps_as_close_to_the_true_distribution_as_ddim_50(prediction_type):
    mu, sigma = _problem()
    ddim_mean, ddim_cov = _errors(DDIMScheduler(200, num_inference_steps=50, prediction_type=prediction_type), mu, sigma)
    assert ddim_mean < 0.05 and ddim_cov < 0.05  # the reference itself is a good sampler
    # the mean follows the ODE exactly for every sampler (error at float32 rounding); the covariance carries
    # the discretisation error: DDIM-50 0.021; default (log-SNR uniform) grid 0.026 / 0.015 / 0.008 at
    # 10 / 15 / 20 steps; time-quadratic grid 0.013 / 0.009 / 0.007
    for spacing, steps, allowed in (("logsnr_uniform", 10, 1.3), ("logsnr_uniform", 15, 1.0), ("logsnr_uniform", 20, 1.0),
                                    ("time_quadratic", 10, 1.0), ("time_quadratic", 15, 1.0), ("time_quadratic", 20, 1.0)):
        sched = DPMSolverMultistepScheduler(200, num_inference_steps=steps, prediction_type=prediction_type, spacing=spacing)
        mean_err, cov_err = _errors(sched, mu, sigma)
        assert mean_err <= max(ddim_mean, 1e-6), (spacing, steps, mean_err, ddim_mean)
        assert cov_err <= allowed * ddim_cov, (spacing, steps, cov_err, ddim_cov)


def test_second_order_beats_first_order_on_the_same_grid():
    mu, sigma = _problem()
    first = _errors(DPMSolverMultistepScheduler(200, num_inference_steps=15, solver_order=1), mu, sigma)
    second = _errors(DPMSolverMultistepScheduler(200, num_inference_steps=15), mu, sigma)
    assert second[1] < first[1] / 3


def test_first_order_is_ddim_on_the_same_grid():
    """DPM-Solver++(1) is DDIM with eta = 0 (Lu et al. 2022, section 4.1): same grid, same latent."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, 4, generator=g)
    w = torch.randn(3, 3, generator=g) * 0.3

    def net(x, t, cond):
        return torch.einsum("oc,bc...->bo...", w, x) * (1 + t.float().view(-1, 1, 1, 1, 1) / 400)

    cond = torch.zeros(2, 0, 4, 4, 4)
    dpm = DPMSolverMultistepScheduler(200, num_inference_steps=50, solver_order=1, spacing="time_uniform")
    ddim = DDIMScheduler(200, num_inference_steps=50)
    assert torch.equal(dpm.timesteps, ddim.timesteps)  # 197, 193, ..., 1 at 50 steps
    a = DiffusionInferer(dpm).sample(net, cond, noise=x, latent_channels=3)
    b = DiffusionInferer(ddim).sample(net, cond, noise=x, latent_channels=3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())  # float32, two formulas


def test_a_second_trajectory_does_not_reuse_the_first_ones_history():
    x = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(2))

    def net(x, t, cond):
        return 0.5 * x

    sched = DPMSolverMultistepScheduler(200, num_inference_steps=10)
    inferer = DiffusionInferer(sched)
    cond = torch.zeros(1, 0, 4, 4, 4)
    first = inferer.sample(net, cond, noise=x, latent_channels=2)
    again = inferer.sample(net, cond, noise=x, latent_channels=2)
    assert torch.equal(first, again)


def test_timesteps_and_bad_arguments():
    assert dpm_solver_timesteps(200, 10, "time_quadratic").tolist() == [197, 158, 124, 94, 68, 46, 29, 15, 6, 1]
    assert dpm_solver_timesteps(200, 50, "time_uniform").tolist() == list(range(197, 0, -4))
    for spacing in ("time_quadratic", "logsnr_uniform"):
        sched = DPMSolverMultistepScheduler(200, num_inference_steps=12, spacing=spacing)
        ts = sched.timesteps.tolist()
        assert ts == sorted(set(ts), reverse=True) and len(ts) == 12 and ts[0] == 197 and ts[-1] == 1
    for spacing in ("time_quadratic", "logsnr_uniform"):  # many steps crowd one end: still distinct, in range
        ts = dpm_solver_timesteps(200, 120, spacing).tolist()
        assert ts == sorted(set(ts), reverse=True) and len(ts) == 120 and ts[0] == 197 and ts[-1] >= 1
    assert dpm_solver_timesteps(200, 197, "logsnr_uniform").tolist() == list(range(197, 0, -1))
    with pytest.raises(ValueError, match="num_inference_steps must be in 1..197"):
        DPMSolverMultistepScheduler(200, num_inference_steps=198)
    with pytest.raises(ValueError, match="spacing 'karras' is not one of"):
        DPMSolverMultistepScheduler(200, spacing="karras")
    with pytest.raises(ValueError, match="solver_order must be 1 or 2"):
        DPMSolverMultistepScheduler(200, solver_order=3)
    with pytest.raises(ValueError, match="timestep 6 is not one of"):
        DPMSolverMultistepScheduler(200, num_inference_steps=10).step(torch.zeros(1), 6, torch.zeros(1))
