"""DDPM maths: forward process, posterior, parameterisations, schedules, guidance. No training."""
import pytest
import torch

import ddpm
from exercises import schedules, timestep_embedding

SCHEDULES = ['linear', 'cosine', 'sigmoid']


@pytest.mark.parametrize('schedule', SCHEDULES)
def test_closed_form_forward_matches_markov_chain(schedule):
    # iterate x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps and compare the empirical moments at a few t with
    # eq. (4): mean sqrt(ab_t) x0, variance 1 - ab_t. Tolerance: 5 standard errors, i.e. 5 sqrt(var / N) for the
    # mean and 5 var sqrt(2 / N) for the variance (Gaussian), so a correct implementation fails ~1e-6 of the time.
    T, N = 1000, 40_000
    beta, ab = ddpm.make_beta(schedule, T), ddpm.make_alpha_bar(schedule, T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0], dtype=torch.float64)
    x = x0.expand(N, 4).clone()
    for t in range(T):
        x = (1 - beta[t]).sqrt() * x + beta[t].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if t in (9, 99, 499, 999):
            mean, var = ab[t].sqrt() * x0, 1 - ab[t]
            assert (x.mean(0) - mean).abs().max() < 5 * (var / N).sqrt(), t
            assert (x.var(0) - var).abs().max() < 5 * var * (2 / N) ** 0.5, t


@pytest.mark.parametrize('schedule', SCHEDULES)
def test_posterior_is_bayes_rule(schedule):
    # q(x_{t-1} | x_t, x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x0, 1 - ab_{t-1}):
    # precision = a_t / b_t + 1 / (1 - ab_{t-1}), mean = var (sqrt(a_t) x_t / b_t + sqrt(ab_{t-1}) x0 / (1 - ab_{t-1}))
    ab = ddpm.make_alpha_bar(schedule, 1000)
    x0, xt = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    for t in (1, 10, 500, 999):
        a_t = ab[t] / ab[t - 1]
        b_t = 1 - a_t
        var = 1 / (a_t / b_t + 1 / (1 - ab[t - 1]))
        mean = var * (a_t.sqrt() * xt / b_t + ab[t - 1].sqrt() * x0 / (1 - ab[t - 1]))
        got_mean, got_var = ddpm.q_posterior(x0, xt, ab[t].item(), ab[t - 1].item())
        torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-10)
        assert abs(got_var - var.item()) < 1e-12 * max(1, var.item())


def test_parameterisations_round_trip():
    ab = ddpm.make_alpha_bar('cosine', 1000)[torch.tensor([0, 10, 500, 990])].view(4, 1, 1, 1)
    x0, eps = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    xt = ddpm.q_sample(x0, ab, eps)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    for objective, out in (('eps', eps), ('x0', x0), ('v', v)):
        torch.testing.assert_close(ddpm.predict_x0(xt, out, ab, objective), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ddpm.predict_eps(xt, x0, ab), eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('schedule', SCHEDULES)
def test_alpha_bar_strictly_decreasing_in_unit_interval(schedule):
    ab = ddpm.make_alpha_bar(schedule, 1000)
    assert ab.dtype == torch.float64
    assert (ab > 0).all() and (ab < 1).all()
    assert (ab[1:] < ab[:-1]).all()


def test_linear_schedule_is_the_papers():
    beta = ddpm.make_beta('linear', 1000)
    assert beta[0].item() == pytest.approx(1e-4) and beta[-1].item() == pytest.approx(0.02)


def test_schedules_report_where_snr_crosses_one(tmp_path, capsys):
    # linear at T = 10 (ldm.py's exercise) keeps alpha_bar near 0.9: SNR never falls to 1, and saying t = 1 is wrong
    schedules.figures(10, tmp_path)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if 'SNR(t) = 1' in line}
    assert 'never' in lines['linear'] and 'at t = 5 |' in lines['cosine']


def test_ddpm_step_is_algorithm_2():
    # Ho et al. Alg. 2, line 4, written from beta alone: x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t)
    # + sigma_t z, with sigma_t^2 = beta tilde_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t (the 'small' variance, eq. 7)
    beta = ddpm.make_beta('linear', 1000)
    x, eps, z = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    for t in (1, 400, 999):
        ab_t, ab_prev = torch.prod(1 - beta[:t + 1]).item(), torch.prod(1 - beta[:t]).item()
        b = beta[t].item()
        sigma = ((1 - ab_prev) / (1 - ab_t) * b) ** 0.5
        want = (x.double() - b / (1 - ab_t) ** 0.5 * eps.double()) / (1 - b) ** 0.5 + sigma * z.double()
        got = ddpm.ddpm_step(x, eps, z, ab_t, ab_prev, sigma, 'eps', clip=False)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('objective', ['eps', 'x0', 'v'])
def test_loss_targets(objective):
    # a network that knows x0 and answers each parameterisation's target, derived here from x_t alone, scores 0; the
    # eps answer scores > 0 under the other objectives (a sign error in v would not score 0)
    ab = ddpm.make_alpha_bar('cosine', 1000).float()
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1

    def oracle(answer):
        def net(xt, t, y):
            a = ab[t].view(-1, 1, 1, 1)
            eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()
            return {'eps': eps, 'x0': x0, 'v': a.sqrt() * eps - (1 - a).sqrt() * x0}[answer]
        return net
    assert ddpm.loss_fn(oracle(objective), x0, None, ab, objective).item() < 1e-8
    for other in {'eps', 'x0', 'v'} - {objective}:
        assert ddpm.loss_fn(oracle(other), x0, None, ab, objective).item() > 1e-2


def test_guidance_weights():
    torch.manual_seed(0)
    model = ddpm.UNet(1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0, resolution=8,
                      num_classes=10)
    with torch.no_grad():  # the paper's zero init makes the output 0; perturb so conditional != unconditional
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([3, 50, 500, 999]), torch.tensor([7, 7, 1, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
        assert (cond - uncond).abs().max() > 1e-3
        torch.testing.assert_close(ddpm.guided(model, x, t, y, 1.0), cond)
        torch.testing.assert_close(ddpm.guided(model, x, t, y, 0.0), uncond)
        torch.testing.assert_close(ddpm.guided(model, x, t, y, 3.0), uncond + 3 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_unet_matches_paper_size():
    assert sum(p.numel() for p in ddpm.UNet().parameters()) == 35_746_307  # Ho et al. CIFAR-10: 35.7M


@pytest.mark.parametrize('ch', [32, 128])
def test_timestep_embedding_similarity_falls_with_the_gap(tmp_path, ch):
    """Exercise 16: nearby timesteps get similar embeddings, distant ones different ones, before and after the MLP.
    At ch 32 (16 frequencies) the similarity stops falling beyond |dt| ~ 100 (README), so 500 is only checked low."""
    sims = timestep_embedding.main(['--ch', str(ch), '--out', str(tmp_path)])
    for name, s in sims.items():  # |dt| = 1, 10, 100, 500
        assert s[0] > 0.95 and s[0] > s[1] > s[2] and s[3] < 0.5 and (ch == 32 or s[2] > s[3]), (name, s)
    assert (tmp_path / 'timestep_embedding.png').exists() and (tmp_path / 'timestep_embedding.csv').exists()
