"""sde.py: the VP-SDE of ddpm.py's schedules, its samplers and likelihoods against closed forms. With Gaussian data
N(m, s^2) the score is known exactly, so samplers must reproduce the data's moments and the ODE its density."""
import math

import numpy as np
import pytest
import torch

import ddpm
import sde

M, S = 0.1, 0.3  # the Gaussian data: mean and standard deviation of every pixel, inside [-1, 1]


class GaussianEps(torch.nn.Module):
    """The exact noise prediction for x_0 ~ N(M, S^2): x_t ~ N(sqrt(ab) M, ab S^2 + 1 - ab), so eps(x_t) = sqrt(1 - ab)
    (x_t - sqrt(ab) M) / (ab S^2 + 1 - ab), with ab of the label's continuous time (or of the discrete chain)."""

    def __init__(self, vp, discrete=False):
        super().__init__()
        self.vp, self.w = vp, torch.nn.Parameter(torch.zeros(()))  # a parameter: the device of the "network"
        self.ab = ddpm.make_alpha_bar(vp.schedule, vp.T) if discrete else None

    def forward(self, x, t, y=None):
        ab = [self.ab[int(v)].item() if self.ab is not None else self.vp.alpha_bar(v / (self.vp.T - 1))
              for v in t.tolist()]
        ab = torch.tensor(ab, dtype=x.dtype).view(-1, *[1] * (x.dim() - 1))
        return (1 - ab).sqrt() * (x - ab.sqrt() * M) / (ab * S ** 2 + 1 - ab) + self.w


def gaussian_data(n, seed=0):
    return M + S * torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_beta_integrates_to_the_discrete_alpha_bar():
    T = 1000
    ab = ddpm.make_alpha_bar('linear', T)
    vp = sde.VPSDE('linear', T)
    assert (vp.beta(0.0), vp.beta(1.0)) == pytest.approx((0.1, 20.0))  # Song et al.'s beta_min, beta_max
    t = torch.linspace(0, 1, 100001, dtype=torch.float64)
    beta = torch.tensor([vp.beta(v) for v in t.tolist()], dtype=torch.float64)
    integral = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(beta, t)])  # int_0^t beta
    t_grid = torch.arange(T, dtype=torch.float64) / (T - 1)  # the discrete chain's times
    integral = torch.from_numpy(np.interp(t_grid.numpy(), t.numpy(), integral.numpy()))
    assert (torch.exp(-integral) - ab).abs().max() < 2e-3  # the discrete chain is this SDE's discretisation
    assert torch.exp(-integral[-1]).item() == pytest.approx(vp.alpha_bar(1.0), rel=1e-6)  # alpha_bar = exp(-int beta)
    cos = sde.VPSDE('cosine', T)
    ab_cos = ddpm.make_alpha_bar('cosine', T)
    assert max(abs(cos.alpha_bar(i / (T - 1)) - ab_cos[i].item()) for i in range(T)) < 1e-12
    for t in (0.1, 0.5, 0.987):  # inside a cell, beta is -d log alpha_bar / dt
        h = 1e-7
        assert -(cos.log_alpha_bar(t + h) - cos.log_alpha_bar(t - h)) / (2 * h) == pytest.approx(cos.beta(t), rel=1e-4)


@pytest.mark.parametrize('sampler, steps, spacing', [('em', 500, 'uniform'), ('rd', 500, 'uniform'),
                                                     ('pc', 300, 'uniform'), ('heun', 50, 'uniform'),
                                                     ('heun', 50, 'quadratic'), ('rk45', 0, 'uniform')])
def test_samplers_with_the_exact_score_reproduce_the_data(sampler, steps, spacing):
    vp = sde.VPSDE('linear', 1000)
    cfg = sde.Config(sampler=sampler, steps=max(steps, 1), spacing=spacing, rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(0)  # pc: 256 pixels, where |z| and |s| concentrate (the corrector's step size)
    shape = (250, 1, 16, 16) if sampler == 'pc' else (4000, 1, 2, 2)
    x, nfe = sde.sample(GaussianEps(vp), torch.randn(shape, generator=g), vp, 'eps', cfg, g)
    assert x.mean().item() == pytest.approx(M, abs=0.01)
    assert x.std().item() == pytest.approx(S, abs=0.01)  # a wrong drift sign or noise scale moves it far
    want = {'em': 501, 'rd': 501, 'pc': 601, 'heun': 101}.get(sampler)  # rk45: what its error control needs
    assert nfe == want if want else 10 < nfe < 300, nfe


def test_heun_time_grids_run_from_one_to_eps_the_quadratic_one_densest_at_eps(monkeypatch):
    grids, heun = [], sde.heun
    monkeypatch.setattr(sde, 'heun', lambda f, x, ts: grids.append(ts) or heun(f, x, ts))
    vp = sde.VPSDE('linear', 1000)
    for spacing in ('uniform', 'quadratic'):
        sde.sample(GaussianEps(vp), torch.randn(4, 1, 2, 2), vp, 'eps', sde.Config(sampler='heun', steps=10,
                                                                                   spacing=spacing, eps=1e-3))
    for ts in grids:
        assert len(ts) == 11 and ts[0] == pytest.approx(1.0) and ts[-1] == pytest.approx(1e-3)
    (u, q), gaps = grids, lambda ts: [a - b for a, b in zip(ts, ts[1:])]
    assert max(gaps(u)) == pytest.approx(min(gaps(u))) and gaps(q)[-1] < gaps(q)[0] / 10


def test_the_corrector_runs_at_the_time_x_lives_at(monkeypatch):
    vp, times = sde.VPSDE('linear', 1000), []
    real = sde.score
    monkeypatch.setattr(sde, 'score', lambda model, x, t, *a: times.append(round(t, 6)) or real(model, x, t, *a))
    sde.reverse_sde(GaussianEps(vp), torch.randn(2, 1, 2, 2), vp, 'eps', 'pc', 2, 0.5)
    assert times == [1.0, 0.75, 0.75, 0.5]  # predictor at t, corrector at t' (where the predictor moved x), ...


def test_the_ode_likelihood_of_gaussian_data_is_its_density():
    vp, y = sde.VPSDE('linear', 1000), gaussian_data(6)
    log_p, nfe = sde.ode_log_p(GaussianEps(vp), y, vp, 'eps', 0, 1e-5, 1e-6, 1e-6)  # the exact divergence
    exact = torch.distributions.Normal(M, S).log_prob(y).flatten(1).sum(1)
    torch.testing.assert_close(log_p, exact, atol=5e-3, rtol=0)  # p_1 is N(0, I) up to a mean of sqrt(ab(1)) M = 7e-4
    hutchinson = torch.stack([sde.ode_log_p(GaussianEps(vp), y, vp, 'eps', 8, 1e-5, 1e-5, 1e-5,
                                            torch.Generator().manual_seed(k))[0] for k in range(4)])
    assert (hutchinson.mean(0) - exact).abs().max() < 0.15  # unbiased: 32 probes in all


def test_bits_per_dim_offset_on_a_known_density():
    D = 784  # y uniform on [-1, 1]^D has log p = -D log 2; x = 128 (y + 1) is then uniform on [0, 256): 8 bits/dim
    assert sde.bits_per_dim(torch.tensor(-D * math.log(2)), D).item() == pytest.approx(8.0)


def test_the_discretised_gaussian_decoder_sums_to_one():
    x = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).view(256, 1)
    for mu, sigma in ((0.0, 0.5), (0.999, 1e-3), (-1.5, 0.01), (0.3, 1e-4), (1.2, 2.0)):
        p = sde.discretised_gaussian(x, torch.full_like(x, mu), sigma).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-9), (mu, sigma)
    normal = torch.distributions.Normal(0.2, 0.1)
    want = normal.cdf(torch.tensor(0.2 + 1 / 255)) - normal.cdf(torch.tensor(0.2 - 1 / 255))
    got = sde.discretised_gaussian(torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.2]), 0.1).exp()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_the_elbo_bounds_the_exact_nll():
    vp = sde.VPSDE('linear', 1000)
    k = ((gaussian_data(64, seed=1) + 1) * 127.5).round().clamp(0, 255)  # 8-bit "images" of 4 pixels
    g = torch.Generator().manual_seed(2)
    elbo = sde.elbo_nats(GaussianEps(vp, discrete=True), k / 127.5 - 1, ddpm.make_alpha_bar('linear', 1000), 'eps',
                         'small', g) / (4 * math.log(2))
    y = (k + torch.rand(k.shape, generator=g)) / 128 - 1
    ode = sde.bits_per_dim(sde.ode_log_p(GaussianEps(vp), y, vp, 'eps', 0, 1e-5, 1e-5, 1e-5)[0], 4)
    entropy = math.log2(S * math.sqrt(2 * math.pi * math.e) * 128)  # of the data, binned at 1/128 on [-1, 1]
    assert ode.mean().item() == pytest.approx(entropy, abs=0.1)
    assert elbo.mean().item() > ode.mean().item()


def test_pf_ode_euler_and_ddim_meet_as_the_steps_grow():
    vp = sde.VPSDE('linear', 1000)
    x = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    d = [sde.same_noise_distance(GaussianEps(vp), x, vp, 'eps', N, 1e-3) for N in (10, 100, 1000)]
    assert d[0] > d[1] > d[2] and d[2] < d[0] / 20, d


def test_rk45_is_fifth_order_both_ways():
    for t0, t1, y0, y1 in ((0.0, 1.0, 1.0, math.e), (1.0, 0.0, math.e, 1.0)):
        y, nfe = sde.rk45(lambda y, t: y * 1.0, torch.tensor([y0], dtype=torch.float64), t0, t1, 1e-10, 1e-10)
        assert abs(y.item() - y1) < 1e-8 and nfe < 250, (y.item(), nfe)


def test_end_to_end_on_a_tiny_checkpoint(tmp_path, capsys):
    ddpm.main(['--dataset', 'mnist', '--device', 'cpu', '--ch', '8', '--ch-mult', '1,2', '--num-res-blocks', '1',
               '--attn-res', '', '--T', '20', '--batch-size', '8', '--steps', '2', '--out', str(tmp_path)])
    run = ['--device', 'cpu', '--out', str(tmp_path)]
    for sampler in ('em', 'pc', 'heun', 'rk45'):
        sde.main(run + ['--sampler', sampler, '--steps', '4', '--n-samples', '3', '--rtol', '1e-3', '--atol', '1e-3'])
    assert np.load(tmp_path / 'samples_pc-N4.npz')['arr_0'].shape == (3, 28, 28, 1)
    assert (tmp_path / 'samples_rk45-tol0.001.npz').exists()
    sde.main(run + ['--mode', 'nll', '--n-images', '2', '--rtol', '1e-3', '--atol', '1e-3'])
    out = capsys.readouterr().out
    assert 'ELBO <=' in out and 'PF-ODE' in out and (tmp_path / 'nll.json').exists()
    sde.main(run + ['--mode', 'compare', '--n-samples', '2'])
    assert 'N = 1000' in capsys.readouterr().out
    torch.save(dict(script='vae', model={}), tmp_path / 'vae.pt')
    with pytest.raises(SystemExit, match='was not written by ddpm'):
        sde.main(['--device', 'cpu', '--ckpt', str(tmp_path / 'vae.pt')])
    with pytest.raises(SystemExit, match='must be in \\(0, 1\\)'):
        sde.main(run + ['--eps', '0'])
