"""gan.py: the WGAN-GP penalty and its per-example interpolation, the optimal discriminator, inpainting's masking, and
tiny end-to-end runs (train, sample, resume bit-identically, DDP, studies, bad input) on CPU."""
import os, socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image

from helpers import sigterm_run
import common
import gan
from exercises import curves, gan_inpaint, gan_study

TINY = ['--dataset', 'mnist', '--device', 'cpu', '--ch', '8', '--z-dim', '8', '--batch-size', '8', '--log-every', '1',
        '--sample-every', '0', '--sample-batch', '16']


def run(tmp_path, *args):
    return gan.main(TINY + ['--out', str(tmp_path)] + list(args))


def linear_critic(scale):
    torch.manual_seed(0)
    D = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 1))
    with torch.no_grad():
        D[1].weight *= scale / D[1].weight.norm()  # ||grad_x D(x)|| = scale everywhere
    return D


def test_gradient_penalty_is_zero_exactly_for_a_unit_gradient_critic():
    x_real, x_fake = torch.randn(16, 2, 5, 5), torch.randn(16, 2, 5, 5)
    assert gan.gradient_penalty(linear_critic(1.0), x_real, x_fake).item() < 1e-12
    assert gan.gradient_penalty(linear_critic(3.0), x_real, x_fake).item() == pytest.approx(4.0, rel=1e-5)  # (3-1)^2
    assert gan.gradient_penalty(linear_critic(0.5), x_real, x_fake).item() == pytest.approx(0.25, rel=1e-5)
    relu_critic = nn.Sequential(nn.Flatten(), nn.Linear(50, 8), nn.ReLU(), nn.Linear(8, 1))
    assert gan.gradient_penalty(relu_critic, x_real, x_fake).item() > 1e-3
    loss, _, _ = gan.d_loss_fn(linear_critic(3.0), x_real, x_fake, 'wgan-gp')  # lambda = 10 enters D's loss
    d = linear_critic(3.0)
    assert loss.item() == pytest.approx(d(x_fake).mean().item() - d(x_real).mean().item() + 40.0, rel=1e-5)


class Recorder(nn.Module):
    """A critic that remembers what it was evaluated on."""

    def forward(self, x):
        self.seen = x.detach().clone()
        return (x ** 2).flatten(1).sum(1)


def test_interpolation_coefficient_is_one_per_example():
    torch.manual_seed(0)
    x_real, x_fake = torch.randn(32, 3, 4, 4), torch.randn(32, 3, 4, 4)
    D = Recorder()
    gan.gradient_penalty(D, x_real, x_fake)
    eps = (D.seen - x_fake) / (x_real - x_fake)  # x^ = eps x + (1 - eps) x~, solved per pixel
    per_example = eps.flatten(1)
    assert torch.allclose(per_example, per_example[:, :1].expand_as(per_example), atol=1e-4)  # one eps per image
    assert per_example[:, 0].min() >= 0 and per_example[:, 0].max() <= 1
    assert per_example[:, 0].std() > 0.1  # and a different one for each image, not one for the batch


def test_trained_discriminator_approaches_the_optimal_one():
    """Goodfellow et al. Prop. 1: D*(x) = p_data(x) / (p_data(x) + p_g(x)). For two Gaussians log p_data / p_g is
    quadratic in x, so a logistic D on (x, x^2) can represent D* exactly; train it with the script's own D loss."""
    torch.manual_seed(0)
    x_data, x_g = torch.randn(20000, 1), 1.0 + 0.5 * torch.randn(20000, 1)  # p_data = N(0, 1), p_g = N(1, 0.5^2)
    quadratic = nn.Linear(2, 1)
    D = lambda x: quadratic(torch.cat([x, x ** 2], 1))  # logit of D
    opt = torch.optim.Adam(quadratic.parameters(), lr=0.05)
    for _ in range(800):
        loss, _, _ = gan.d_loss_fn(D, x_data, x_g, 'bce')
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.linspace(-1.5, 2.5, 41)[:, None]
    normal = lambda x, mu, s: torch.exp(-0.5 * ((x - mu) / s) ** 2) / s
    d_star = normal(x, 0, 1) / (normal(x, 0, 1) + normal(x, 1, 0.5))
    with torch.no_grad():
        assert (torch.sigmoid(D(x)) - d_star).abs().max() < 0.03


def test_generator_loss_is_the_non_saturating_one():
    logits = torch.tensor([-3.0, 0.0, 2.0])
    expected = -torch.log(torch.sigmoid(logits)).mean()  # -log D(G(z)), Goodfellow et al. sec. 3
    assert gan.g_loss_fn(logits, 'bce').item() == pytest.approx(expected.item(), rel=1e-6)
    assert gan.g_loss_fn(logits, 'wgan-gp').item() == pytest.approx(-logits.mean().item())


def test_inpainting_keeps_known_pixels_and_never_shows_masked_ones():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    m = gan_inpaint.random_masks(6, 8, 'cpu')
    assert torch.equal(m.sum((1, 2, 3)), torch.full((6,), 16.0)) and len({tuple(r.flatten().tolist()) for r in m}) > 1
    seen = []

    def g(inp, t):
        seen.append(inp.clone())
        return torch.randn(len(inp), 4, 8, 8)  # C + 1 channels, as ddpm's U-Net on (image, mask) returns

    out = gan_inpaint.inpaint(g, x, m)
    x_other = torch.where(m.bool(), torch.rand_like(x) * 2 - 1, x)  # the same image with other masked pixels
    gan_inpaint.inpaint(g, x_other, m)
    assert torch.equal(seen[0], seen[1])  # g's input is blind to the masked pixels
    assert torch.equal(seen[0][:, 3:], m)  # ... and carries the mask
    assert torch.equal(out[m.expand_as(x) == 0], x[m.expand_as(x) == 0])  # known pixels pass through exactly
    assert not torch.equal(out[m.expand_as(x) == 1], x[m.expand_as(x) == 1])


def test_train_then_sample_writes_grid_checkpoint_and_npz(tmp_path):
    run(tmp_path, '--steps', '3')
    assert (tmp_path / 'config.json').exists() and len((tmp_path / 'log.txt').read_text().splitlines()) == 3
    assert Image.open(tmp_path / 'samples_0000003.png').size == (8 * 30 + 2, 8 * 30 + 2)  # 64 images of 28x28
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 3 and {'G', 'D', 'ema', 'opt_g', 'opt_d'} <= set(ckpt)
    run(tmp_path, '--mode', 'sample', '--n-samples', '20')
    x = np.load(tmp_path / 'samples.npz')['arr_0']
    assert x.shape == (20, 28, 28, 1) and x.dtype == np.uint8 and x.std() > 0
    assert len(list((tmp_path / 'samples').glob('*.png'))) == 20


@pytest.mark.parametrize('loss', ['bce', 'wgan-gp'])
def test_resume_is_bit_identical(tmp_path, loss):
    extra = ['--loss', loss, '--n-critic', '2', '--ema', '0.9']
    _, _, stats_a = run(tmp_path / 'a', '--steps', '4', *extra)
    run(tmp_path / 'b', '--steps', '3', *extra)  # "interrupted" after step 3
    _, _, stats_b = run(tmp_path / 'b', '--steps', '4', '--resume', '1', *extra)
    assert stats_a == stats_b  # the next step's losses, D outputs and gradient norms, bit for bit
    a, b = (torch.load(p / 'ckpt.pt', weights_only=True) for p in (tmp_path / 'a', tmp_path / 'b'))
    for key in ('G', 'D', 'ema'):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for key in ('opt_g', 'opt_d'):
        for i, state in a[key]['state'].items():
            assert all(torch.equal(v, b[key]['state'][i][k]) for k, v in state.items()), (key, i)


def test_finished_run_and_changed_model_on_resume(tmp_path, capsys):
    run(tmp_path, '--steps', '1')
    run(tmp_path, '--steps', '1', '--resume', '1')
    assert 'nothing to train' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='different ch'):
        run(tmp_path, '--steps', '2', '--ch', '16', '--resume', '1')
    with pytest.raises(SystemExit, match='--resume 1 to continue'):
        run(tmp_path, '--steps', '2')


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    step = sigterm_run('gan.py', TINY + ['--out', tmp_path, '--steps', '100000', '--ckpt-every', '100000'], tmp_path)
    assert step >= 3
    run(tmp_path, '--steps', str(step + 1), '--resume', '1')
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == step + 1


@pytest.mark.parametrize('args, message', [
    (['--loss', 'hinge'], "--loss 'hinge' is not one of: bce, wgan-gp"),
    (['--dataset', 'imagenet'], "unknown dataset 'imagenet'"),
    (['--beta1', '1.5'], '--beta1 1.5 must be in'),
    (['--n-critic', '0'], '--n-critic 0 must be > 0'),
    (['--mode', 'sample'], 'no checkpoint at'),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, '--steps', '1', *args)


@pytest.fixture
def fake_scorer(monkeypatch):
    """eval_fid.Scorer stand-in (the real one runs the Inception network): records what it scores."""
    import eval_fid
    scored = []

    class Scorer:
        def __init__(self, ref, device, images=None):
            self.ref = ref

        def __call__(self, x):
            scored.append((self.ref, x.shape, x.dtype))
            return 42.0

    monkeypatch.setattr(eval_fid, 'Scorer', Scorer, raising=False)
    return scored


def test_fid_during_training_is_logged_and_plotted(tmp_path, fake_scorer):
    run(tmp_path, '--steps', '2', '--fid-every', '1', '--fid-samples', '10')
    assert fake_scorer == [('mnist:test', (10, 1, 28, 28), torch.uint8)] * 2  # the CPU preset's reference
    assert (tmp_path / 'log.txt').read_text().splitlines()[-1] == 'step 2 | fid10 42.0000'
    curves.plot_logs({'run': tmp_path}, tmp_path / 'plot.png')
    assert curves.read_log(tmp_path / 'log.txt')['FID'] == ([1, 2], [42.0, 42.0])


def test_inpaint_study_trains_both_and_writes_figure_and_metrics(tmp_path, fake_scorer):
    gan_inpaint.main(TINY + ['--out', str(tmp_path), '--steps', '2', '--fid-samples', '12'])
    with pytest.raises(SystemExit, match='inpainting needs'):
        gan_inpaint.main(TINY + ['--out', str(tmp_path / 'w'), '--loss', 'wgan-gp'])
    rows = (tmp_path / 'inpaint.txt').read_text().splitlines()
    assert [r.split()[0] for r in rows] == ['mse', 'mse+adv'] and all('masked MSE' in r for r in rows)
    assert (tmp_path / 'inpaint_test.png').exists() and (tmp_path / 'inpaint.png').exists()
    logs = curves.read_log(tmp_path / 'mse' / 'log.txt')
    assert logs['loss G'] == logs['mse'] and 'D(x)' in logs  # MSE alone: D is trained, but only watches
    assert torch.load(tmp_path / 'mse+adv' / 'ckpt.pt', weights_only=True)['config']['adv_weight'] > 0


def _ddp_worker(rank, port, out, loss):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = common.parse_config(gan.Config, gan.PRESETS, gan.pick, TINY + ['--out', out, '--steps', '2', '--loss', loss])
    G, D, _ = gan.train(cfg)
    torch.save({'G': G.state_dict(), 'D': D.state_dict()}, os.path.join(out, f'rank{rank}.pt'))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize('loss', ['bce', 'wgan-gp'])  # bce: batch norm in G and D; wgan-gp: in G only
def test_ddp_two_processes_keep_weights_identical(tmp_path, loss):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path), loss), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    for net in ('G', 'D'):
        for k, v in r0[net].items():  # batch-norm statistics included: averaged over the ranks
            assert torch.equal(v, r1[net][k]), (net, k)


def test_versus_study_trains_both_losses_for_the_same_epochs(tmp_path, fake_scorer):
    gan_study.main(TINY + ['--out', str(tmp_path), '--study', 'versus', '--epochs', '0.002', '--fid-samples', '8'])  # 120 real images for D in each run
    rows = (tmp_path / 'versus.txt').read_text().splitlines()
    assert [r.split(' | ')[:2] for r in rows] == [['bce       ', 'steps 15'], ['wgan-gp   ', 'steps 3']]  # 120/8, 120/40
    cfg = torch.load(tmp_path / 'wgan-gp' / 'ckpt.pt', weights_only=True)['config']
    assert (cfg['lr'], cfg['beta1'], cfg['beta2'], cfg['n_critic'], cfg['gp_lambda']) == (1e-4, 0.0, 0.9, 5, 10.0)
    assert torch.load(tmp_path / 'bce' / 'ckpt.pt', weights_only=True)['config']['beta1'] == 0.5


def test_bench_prints_throughput(tmp_path, capsys):
    import bench
    bench.main(['gan'] + TINY + ['--out', str(tmp_path), '--loss', 'wgan-gp'])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert 'wgan-gp, n_critic 5, batch 8' in line and float(line.split(' img/s')[0].split('| ')[-1]) > 0
    assert not (tmp_path / 'ckpt.pt').exists()  # it trains in a temporary folder
