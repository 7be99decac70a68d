"""ddim.py: samplers against an exact (analytic) denoiser, eta = 1 == DDPM, inversion, the diffusers import, bad
input, and every mode end to end on a tiny ddpm.py checkpoint."""
import sys, types

import numpy as np
import pytest
import torch
from PIL import Image

import ddim
import ddpm
from exercises import ddim_steps, ho_weights, speedrun

# -----------------------------------------------------------------------------
# Gaussian data x0 ~ N(m, s^2 I): the optimal eps-prediction is closed-form, so a sampler's output distribution can be
# checked against N(m, s^2) directly. m and s keep P(|x0| > 1) < 1e-3, so the samplers' final clamp is negligible.

M, S, D, N = 0.2, 0.25, 16, 4000  # mean, std, dimension, samples: 64000 scalars
T = 1000
AB = ddpm.make_alpha_bar('linear', T)
CFG = ddpm.Config(T=T, schedule='linear', objective='eps', clip=False, bf16=False, var='small')


class Gaussian(torch.nn.Module):
    """E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) m) / (ab s^2 + 1 - ab), looking like ddpm.UNet to the samplers."""

    def __init__(self):
        super().__init__()
        self.register_buffer('ab', AB.clone())
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so next(model.parameters()) gives the device

    def forward(self, x, t, y=None):
        ab = self.ab[t].view(-1, *[1] * (x.dim() - 1))
        return ((1 - ab).sqrt() * (x - ab.sqrt() * M) / (ab * S ** 2 + 1 - ab)).float()


# Tolerance: 5 standard errors (mean: S / sqrt(N D) = 0.001; variance: sqrt(2 / (N D)) = 0.56% relative) plus each
# sampler's own discretisation bias, measured with 10^6 scalars and explained by the maths: Alg. 2 with sigma^2 = beta
# tilde leaves out Var[x0 | x_t] (-3.2%, and eta = 1 at S = T gives the same); DDIM's last step returns E[x0 | x_t1],
# which shrinks the variance more the coarser the grid; DPM-Solver++(2M) is within 5% from S = 10 on.
def sample_stats(sampler, steps, eta, spacing):
    run, g = ddim.Config(sampler=sampler, steps=steps, eta=eta, spacing=spacing), torch.Generator().manual_seed(0)
    x = ddim.sample(Gaussian(), torch.randn(N, D, generator=g), CFG, run, None, g).double()
    return x.mean().item(), x.var().item() / S ** 2


@pytest.mark.parametrize('sampler,steps,eta,spacing,bias', [
    ('ddpm', T, 1.0, 'uniform', 0.032), ('ddim', T, 0.0, 'uniform', 0.013), ('ddim', 100, 0.0, 'quadratic', 0.042),
    ('ddim', 100, 1.0, 'quadratic', 0.09), ('dpm++2m', 20, 0.0, 'quadratic', 0.052),
    ('dpm++2m', 10, 0.0, 'quadratic', 0.003)])
def test_samplers_recover_the_gaussian(sampler, steps, eta, spacing, bias):
    mean, var = sample_stats(sampler, steps, eta, spacing)
    assert abs(mean - M) < 0.005 + 0.001, mean
    assert abs(var - 1) < 0.028 + bias, var


@pytest.mark.parametrize('steps', [10, 20])
def test_dpm_solver_beats_ddim_at_few_steps(steps):  # the GPU target (FID at 10 and 20 evaluations), in miniature
    dpm, ddim_ = (sample_stats(s, steps, 0.0, 'quadratic')[1] for s in ('dpm++2m', 'ddim'))
    assert abs(dpm - 1) < abs(ddim_ - 1) / 3, (dpm, ddim_)


def test_eta1_is_the_ddpm_posterior_and_eta0_is_deterministic():
    ab = AB
    for t in (1, 10, 500, 999):  # sigma(eta = 1)^2 of eq. (16) == beta tilde, eq. (7)
        var = ddpm.q_posterior(0.0, 0.0, ab[t].item(), ab[t - 1].item())[1]
        assert ddim.ddim_sigma(ab[t].item(), ab[t - 1].item(), 1.0) ** 2 == pytest.approx(var, rel=1e-9)
    g = torch.Generator().manual_seed(1)
    x, out, z = (torch.randn(3, 5, generator=g) for _ in range(3))
    for objective in ('eps', 'x0', 'v'):  # ... and the whole step equals ddpm.py's Alg. 2 step, for any objective
        ab_t, ab_prev = ab[300].item(), ab[299].item()
        sigma = ddim.ddim_sigma(ab_t, ab_prev, 1.0)
        torch.testing.assert_close(ddim.ddim_step(x, out, z, ab_t, ab_prev, sigma, objective, True),
                                   ddpm.ddpm_step(x, out, z, ab_t, ab_prev, sigma, objective, True))
    xT, ts = torch.randn(8, D), ddim.timesteps(T, 20, 'uniform')
    a, b = (ddim.ddim_sample(Gaussian(), xT, ts, ab, 0.0, 'eps', False, generator=torch.Generator().manual_seed(s))
            for s in (0, 1))
    assert torch.equal(a, b)
    c = ddim.ddim_sample(Gaussian(), xT, ts, ab, 1.0, 'eps', False, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


def test_inversion_then_decoding_reconstructs():
    x0 = (M + S * torch.randn(256, D, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)  # decoding clamps
    ts = ddim.timesteps(T, 100, 'quadratic')
    xT = ddim.ddim_invert(Gaussian(), x0, ts, AB, 'eps')
    assert abs(xT.std().item() - 1) < 0.05  # a real encoding: x_T is noise-like (x0 has std 0.25) ...
    rec = ddim.ddim_sample(Gaussian(), xT, ts, AB, 0.0, 'eps', False).clamp(-1, 1)  # decoded to pixels
    rmse = (rec - x0).pow(2).mean().sqrt().item()
    assert rmse < 0.015, rmse  # ... that decodes back (measured 0.0105 at S = 100; 0.004 at S = T; 0.35 for new noise)


@pytest.mark.parametrize('spacing', ['uniform', 'quadratic'])
def test_timesteps(spacing):
    for S_ in (1, 2, 10, 999, 1000):
        ts = ddim.timesteps(T, S_, spacing)
        assert len(ts) == S_ and ts[-1] == T - 1 and ts[0] == (0 if S_ > 1 else T - 1)
        assert all(b > a for a, b in zip(ts, ts[1:]))


# -----------------------------------------------------------------------------
# Ho et al.'s model in diffusers' layout


def test_diffusers_import_matches_unet2dmodel(tmp_path):
    diffusers = pytest.importorskip('diffusers')  # a guard only: CI installs diffusers (see the report)
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256],
                                down_block_types=['DownBlock2D', 'AttnDownBlock2D'], layers_per_block=2,
                                up_block_types=['AttnUpBlock2D', 'UpBlock2D'], norm_eps=1e-6,
                                downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None)
    with torch.no_grad():
        for p in ref.parameters():  # nothing left at zero init, so every mapped tensor matters
            p.add_(0.1 * torch.randn_like(p))
    ref.eval().save_pretrained(tmp_path / 'ho')
    model, mcfg = ho_weights.load_diffusers(tmp_path / 'ho')
    assert (mcfg.ch, mcfg.ch_mult, mcfg.attn_res, mcfg.num_res_blocks) == (128, '1,2', '16', 2)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t), ref(x, t).sample, atol=1e-5, rtol=1e-4)
    ho_weights.main([str(tmp_path / 'ho'), '--out', str(tmp_path / 'o')])
    ddim.main(['--out', str(tmp_path / 'o'), '--device', 'cpu', '--n-samples', '2', '--steps', '2'])
    assert np.load(tmp_path / 'o' / 'samples_ddim-S2-eta0.npz')['arr_0'].shape == (2, 32, 32, 3)


# -----------------------------------------------------------------------------
# End to end on a tiny ddpm.py checkpoint (T = 20, 28x28 MNIST)

TINY = ['--dataset', 'mnist', '--device', 'cpu', '--ch', '8', '--ch-mult', '1,2', '--num-res-blocks', '1',
        '--attn-res', '14', '--T', '20', '--batch-size', '8', '--log-every', '1', '--sample-every', '0']


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddpm')
    ddpm.main(TINY + ['--steps', '2', '--out', str(out)])
    return out


def run(out, *args):
    return ddim.main(['--out', str(out), '--device', 'cpu', '--n-samples', '2', '--steps', '4'] + list(args))


def size(path):
    return Image.open(path).size


@pytest.fixture
def fake_fid(monkeypatch):
    """A stand-in eval_fid for the plumbing (the real one needs the Inception weights and time); lists refs asked."""
    seen = []

    class Scorer:
        def __init__(self, ref, device):
            seen.append(ref)

        def __call__(self, x):
            return float(x.float().mean()) ** 2
    monkeypatch.setitem(sys.modules, 'eval_fid', types.SimpleNamespace(Scorer=Scorer))
    return seen


def test_every_mode_writes_its_outputs(run_dir, fake_fid):
    run(run_dir, '--n-samples', '3', '--sample-batch', '2')
    x = np.load(run_dir / 'samples_ddim-S4-eta0.npz')['arr_0']
    assert x.shape == (3, 28, 28, 1) and x.dtype == np.uint8
    assert len(list((run_dir / 'samples_ddim-S4-eta0').glob('*.png'))) == 3
    run(run_dir, '--sampler', 'dpm++2m', '--save', 'npz')
    assert np.load(run_dir / 'samples_dpm++2m-S4-eta0.npz')['arr_0'].shape == (2, 28, 28, 1)
    run(run_dir, '--sampler', 'ddpm', '--save', 'npz')  # ancestral: all T steps, named by what ran (eta 1)
    assert np.load(run_dir / 'samples_ddpm-S20-eta1.npz')['arr_0'].shape == (2, 28, 28, 1)
    cell = 30  # 28 pixels + 2 of padding
    ddim_steps.main(['--out', str(run_dir), '--device', 'cpu', '--n-samples', '2', '--grid-steps', '20,3'])
    assert size(run_dir / 'sweep.png') == (6 * cell + 2, 2 * cell + 2)  # 2 S x (3 samplers x 2 images)
    run(run_dir, '--mode', 'invert')
    assert size(run_dir / 'invert.png') == (2 * cell + 2, 3 * cell + 2)
    run(run_dir, '--mode', 'interp')
    assert size(run_dir / 'interp.png') == (10 * cell + 2, 2 * cell + 2)
    run(run_dir, '--mode', 'sdedit')
    assert size(run_dir / 'sdedit.png') == (13 * cell + 2, 2 * cell + 2)
    assert size(run_dir / 'sdedit_steps.png') == (6 * cell + 2, 2 * cell + 2)
    run(run_dir, '--mode', 'inpaint', '--sampler', 'ddpm')
    assert size(run_dir / 'inpaint.png') == (2 * cell + 2, 3 * cell + 2)
    ddim_steps.main(['--out', str(run_dir), '--device', 'cpu', '--grid-steps', '20,2', '--fid-samples', '3'])
    lines = (run_dir / 'fid_steps.csv').read_text().splitlines()
    assert fake_fid == ['mnist:train'] and len(lines) == 1 + 6 and lines[2].startswith('ddpm-S20-eta1,')


def test_speedrun_trains_for_its_time_budget_then_scores_once(tmp_path, fake_fid, capsys):
    args = ['--out', str(tmp_path), '--device', 'cpu', '--fid-samples', '3', '--steps', '3',
            '--train', ' '.join(TINY) + ' --time-budget 1 --steps 5000']
    speedrun.main(args)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert 1 <= ckpt['clock'] < 30 and 1 < ckpt['step'] < 5000  # stopped by the clock, not by --steps
    last = capsys.readouterr().out.splitlines()[-3:]
    assert last[0].startswith(f'budget 1 s | {ckpt["step"]} steps in {ckpt["clock"]:.1f} s of training | ')
    assert last[1].startswith('sampling 3 images with ddim, S = 3, eta = 1: ')
    assert last[2].startswith('FID-3 against mnist:')
    assert Image.open(tmp_path / 'speedrun.png').size == (10 * 30 + 2, 30 + 2)  # rows of 10
    speedrun.main(args)  # the budget is spent: straight to sampling, no more training
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == ckpt['step']
    with pytest.raises(SystemExit, match='trained with other lr'):  # a variant must not reuse another's run
        speedrun.main(args[:-1] + [args[-1] + ' --lr 1e-3'])
    with pytest.raises(SystemExit):  # it trains its own model into --out: there is no --ckpt to give
        speedrun.main(args + ['--ckpt', str(tmp_path / 'ckpt.pt')])


def test_inpainting_noises_the_known_pixels_with_the_forward_process():
    # halfway through, the known coordinates must be a fresh draw of q(x_t | x0) = N(sqrt(ab) x0, 1 - ab), not x0
    x0 = torch.full((N, D), 0.3)
    keep = torch.arange(D) < D // 2
    ts, snaps = ddim.timesteps(T, 50, 'uniform'), []
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    ddim.ddim_sample(Gaussian(), x, ts, AB, 1.0, 'eps', False, None, 1.0, torch.Generator().manual_seed(0), snaps,
                     (x0, keep))
    known = snaps[25][:, keep].double()  # x after step 24, i.e. at t = ts[25]
    ab = AB[ts[25]].item()
    n = known.numel()
    assert abs(known.mean().item() - ab ** 0.5 * 0.3) < 5 * ((1 - ab) / n) ** 0.5
    assert abs(known.var().item() - (1 - ab)) < 5 * (1 - ab) * (2 / n) ** 0.5


def test_inpainting_keeps_the_known_pixels(run_dir):
    run(run_dir, '--mode', 'inpaint', '--mask', 'right')
    im = np.asarray(Image.open(run_dir / 'inpaint.png'))
    left = (slice(2, 30), slice(2, 16))  # first image, known left half: original (row 0) == result (row 2)
    assert np.array_equal(im[left], im[2 * 30:][left])


def test_bad_input_fails_clearly(run_dir, tmp_path):
    with pytest.raises(SystemExit, match='between 1 and .* T = 20'):
        run(run_dir, '--steps', '21')
    with pytest.raises(SystemExit, match='between 1 and .* T = 20'):
        ddim_steps.main(['--out', str(run_dir), '--device', 'cpu', '--grid-steps', '1000,10'])
    with pytest.raises(SystemExit, match='--steps 0 must be > 0'):
        run(run_dir, '--steps', '0')
    with pytest.raises(SystemExit, match=r'--eta -0.5 must be in \[0, 1\]'):
        run(run_dir, '--eta', '-0.5')
    torch.save(dict(script='vae', model={}), tmp_path / 'vae.pt')
    with pytest.raises(SystemExit, match='not written by ddpm'):
        ddim.main(['--ckpt', str(tmp_path / 'vae.pt'), '--device', 'cpu'])
    Image.new('L', (32, 32)).save(tmp_path / 'big.png')
    with pytest.raises(SystemExit, match='is 32x32, but the model makes 28x28'):
        run(run_dir, '--mode', 'sdedit', '--image', str(tmp_path / 'big.png'))
    with pytest.raises(SystemExit, match="--sampler 'euler' is not one of"):
        run(run_dir, '--sampler', 'euler')
