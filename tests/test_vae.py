"""vae.py: the KL, the discretised likelihood and the ELBO / IWAE bounds against closed forms; tiny CPU runs."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import vae
from exercises import curves, vae_sweep

TINY = ['--device', 'cpu', '--dataset', 'mnist', '--arch', 'conv', '--ch', '4', '--hidden', '16', '--latent', '3',
        '--batch-size', '8', '--log-every', '1', '--eval-n', '12', '--eval-k', '4']


def run(tmp_path, *args):
    return vae.main(TINY + ['--out', str(tmp_path)] + list(args))


def test_kl_closed_form_equals_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    z = mu + (0.5 * logvar).exp() * torch.randn(200000, 3, 4, generator=g)
    log_q = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    mc = (log_q - log_p).mean(0)  # KL = E_q[log q - log p]
    torch.testing.assert_close(vae.kl_normal(mu, logvar), mc, atol=0.03, rtol=0.01)


def test_discretised_logistic_is_a_distribution_over_256_values():
    x = (torch.arange(256.0) * 2 / 255 - 1).view(256, 1)  # every 8-bit value, for 3 (mu, log s) pairs
    mu, log_s = torch.tensor([[0.0, 0.93, -1.2]]), torch.tensor([[-1.0, -5.0, 0.5]])
    logp = vae.discretised_logistic(x, mu, log_s).double()
    torch.testing.assert_close(logp.exp().sum(0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    s = log_s.exp().double()  # an inner bin: the logistic CDF difference, written out
    cdf = lambda v: torch.sigmoid((v - mu.double()) / s)
    torch.testing.assert_close(logp[100], (cdf(x[100].double() + 1 / 255) - cdf(x[100].double() - 1 / 255)).log()[0],
                               rtol=1e-5, atol=1e-5)


class PPCA(nn.Module):
    """Linear-Gaussian VAE: p(z) = N(0, I), p(x|z) = N(W z + b, s2 I), so log p(x) = log N(x; b, W W^T + s2 I); the
    encoder is deliberately imperfect (shrunk mean, diagonal variance), so the ELBO is strictly below log p(x)."""

    def __init__(self, D=5, d=2, s2=0.3):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W, self.b, self.s2 = torch.randn(D, d, generator=g), torch.randn(D, generator=g), s2
        M = self.W.T @ self.W + s2 * torch.eye(d)
        self.A, self.logvar = 0.8 * torch.linalg.solve(M, self.W.T), (s2 * torch.linalg.inv(M)).diag().log() + 0.5

    def posterior(self, x):
        return (x - self.b) @ self.A.T, self.logvar.expand(len(x), -1)

    def log_px(self, x, z):
        return torch.distributions.Normal(z @ self.W.T + self.b, self.s2 ** 0.5).log_prob(x).sum(1)

    def log_marginal(self, x):
        cov = self.W @ self.W.T + self.s2 * torch.eye(len(self.b))
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)


def test_elbo_below_iwae_below_log_px_and_iwae_converges_on_ppca():
    torch.manual_seed(0)
    model = PPCA()
    x = torch.randn(256, 2) @ model.W.T + model.b + model.s2 ** 0.5 * torch.randn(256, 5)
    logp = model.log_marginal(x).double().mean().item()
    g = torch.Generator().manual_seed(0)
    rec, kl, _ = vae.bounds(model, x, 2000, chunk=256 * 100, generator=g)
    elbo = (rec - kl).mean().item()  # E_q[log p(x|z)] - KL
    iwae1 = vae.bounds(model, x.repeat(200, 1), 1, generator=g)[2].mean().item()  # 200 one-draw bounds per x
    iwae = {k: vae.bounds(model, x, k, chunk=256 * 100, generator=g)[2].mean().item() for k in (10, 100, 3000)}
    assert abs(iwae1 - elbo) < 0.05  # L_1 is the ELBO
    assert elbo < iwae[10] < iwae[100] < iwae[3000] <= logp + 1e-3
    assert logp - elbo > 0.3  # the encoder is imperfect ...
    assert logp - iwae[3000] < 0.05 * (logp - elbo)  # ... and the IWAE bound closes the gap as k grows


def test_gradients_reach_encoder_and_decoder_through_the_reparameterisation():
    cfg = vae.Config(arch='conv', ch=4, hidden=16, latent=3)
    model = vae.VAE(cfg, 1, 28)
    x = vae.to_model(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), 'bernoulli')
    rec, kl = model(x)
    (-rec.mean()).backward()  # reconstruction term alone: the encoder learns from it only through z = mu + sigma eps
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_train_then_sample_writes_grid_checkpoint_and_npz(tmp_path):
    model, m = run(tmp_path, '--steps', '3')
    curves.main([str(tmp_path)])  # the loss curve, reconstruction and KL apart
    for f in ('ckpt.pt', 'config.json', 'log.txt', 'prior.png', 'recon.png', 'curves.png', 'eval.json'):
        assert (tmp_path / f).exists(), f
    assert Image.open(tmp_path / 'prior.png').size == (10 * 30 + 2, 10 * 30 + 2)  # 10x10 grid of 28x28
    assert m['unit'] == 'nats' and m['k'] == 4 and m['n'] == 12 and m['nelbo'] >= m['iwae'] > 0
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 3
    run(tmp_path, '--mode', 'sample', '--n-samples', '5')
    x = np.load(tmp_path / 'samples.npz')['arr_0']
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8 and x.std() > 0
    assert len(list((tmp_path / 'samples').glob('*.png'))) == 5
    run(tmp_path, '--mode', 'interp')
    assert Image.open(tmp_path / 'interp.png').size == (12 * 30 + 2, 8 * 30 + 2)


def test_autoencoder_for_ldm_on_rgb_with_rfid(tmp_path, monkeypatch):
    monkeypatch.setenv('FID_WEIGHTS', str(vae.common.data_dir() / 'weights' / 'pt_inception-2015-12-05-nofc.pth'))
    _, m = run(tmp_path, '--dataset', 'cifar10-subset', '--arch', 'ae', '--latent', '4', '--steps', '2',
               '--eval-n', '6', '--rfid', '6')
    assert m['unit'] == 'per dim' and 'iwae' not in m and m['psnr'] > 0 and m['rfid'] > 0  # the real Inception
    model, cfg = vae.load_autoencoder(tmp_path / 'ckpt.pt')
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 4, 8, 8) and not model.training and cfg.f == 4
    torch.testing.assert_close(z, model.posterior(x)[0])  # the posterior mean, no noise
    y = model.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_resume_is_bit_identical(tmp_path):
    args = ['--likelihood', 'logistic', '--dataset', 'fashion-mnist']
    model_a, _ = run(tmp_path / 'a', '--steps', '4', *args)
    run(tmp_path / 'b', '--steps', '3', *args)  # "interrupted" after step 3
    model_b, _ = run(tmp_path / 'b', '--steps', '4', '--resume', '1', *args)
    last = [(tmp_path / r / 'log.txt').read_text().splitlines()[-1].split(' | ')[:4] for r in ('a', 'b')]
    assert last[0] == last[1] and last[0][0] == 'step 4'  # the next step's loss, recon and KL, to 4 decimals
    a, b = (torch.load(tmp_path / r / 'ckpt.pt', weights_only=True) for r in ('a', 'b'))
    for name in a['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name
    assert a['opt']['state'][0]['exp_avg_sq'].equal(b['opt']['state'][0]['exp_avg_sq'])


def test_sweep_writes_table_and_figures(tmp_path):
    vae_sweep.main(TINY + ['--out', str(tmp_path), '--sweep', 'beta', '--values', '0.5,4', '--steps', '2'])
    rows = (tmp_path / 'sweep.csv').read_text().splitlines()
    assert rows[0].startswith('beta,recon,kl,nelbo,iwae,mse,psnr') and len(rows) == 3
    assert (tmp_path / 'sweep.png').exists() and (tmp_path / 'sweep_grids.png').exists()


def test_fid_during_training_is_logged(tmp_path, monkeypatch):
    import eval_fid

    seen = []

    class Scorer:  # stands in for eval_fid.Scorer (the Inception network is tested in test_fid.py)
        def __init__(self, ref, device):
            seen.append(ref)

        def __call__(self, x):
            seen.append(x)
            return 12.5

    monkeypatch.setattr(eval_fid, 'Scorer', Scorer, raising=False)
    run(tmp_path, '--steps', '2', '--fid-every', '2', '--fid-samples', '7')
    assert seen[0] == 'mnist:train' and seen[1].shape == (7, 1, 28, 28) and seen[1].dtype == torch.uint8
    assert 'step 2 | fid7 12.5000' in (tmp_path / 'log.txt').read_text()


@pytest.mark.parametrize('args, message', [
    (['--arch', 'resnet'], "--arch 'resnet' is not one of: mlp, conv, ae"),
    (['--beta', '-1'], '--beta -1.0 must be >= 0'),
    (['--latent', '0'], '--latent 0 must be > 0'),
    (['--arch', 'mlp', '--likelihood', 'l2'], 'not a likelihood'),
    (['--arch', 'ae', '--f', '8'], 'downsamples by 2 or 4'),
    (['--mode', 'eval'], 'no checkpoint at'),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, '--steps', '1', *args)


def test_checkpoint_refuses_other_data(tmp_path):
    run(tmp_path, '--steps', '1')
    with pytest.raises(SystemExit, match='different dataset'):
        run(tmp_path, '--steps', '2', '--dataset', 'cifar10-subset', '--resume', '1')
    with pytest.raises(SystemExit, match='--resume 1 to continue'):
        run(tmp_path, '--steps', '2')
    model, _ = vae.load_autoencoder(tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match=r'this model takes 1x28x28 images \(mnist\); got 3x32x32'):
        model.encode(torch.zeros(1, 3, 32, 32))


def _ddp_worker(rank, port, out):
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, _ = vae.train(vae.common.parse_config(vae.Config, vae.PRESETS, vae.pick, TINY + ['--out', out, '--steps', '3']))
    torch.save(model.state_dict(), f'{out}/rank{rank}.pt')
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_keep_replicas_identical(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    init = vae.VAE(vae.common.parse_config(vae.Config, vae.PRESETS, vae.pick, TINY), 1, 28).state_dict()
    assert any(not torch.equal(r0[k], init[k]) for k in r0)  # it trained ...
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # ... and the ranks, fed different batches, agree exactly
    assert (tmp_path / 'eval.json').exists()
