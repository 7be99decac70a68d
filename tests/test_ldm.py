"""ldm.py on CPU: the v maths, the latent DDIM step against the forward process, the scale factor, both stages end to
end, exact resume, cross-attention, and clear errors for a wrong autoencoder."""
import math, re, time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import sigterm_run
import common
import ddpm
import ddim
import ldm
import vae
from exercises import curves, ldm_schedules

N_TRAIN = 256  # the stage-1 tests encode this many training images, not 60,000
TINY = ['--dataset', 'mnist', '--device', 'cpu', '--ch', '8', '--attn-res', '4', '--T', '20', '--batch-size', '8',
        '--log-every', '1', '--sample-steps', '3', '--sample-every', '0']
VAE_ARGS = '--steps 2 --ch 4 --batch-size 8 --eval-n 8'


@pytest.fixture(autouse=True)
def small_dataset(monkeypatch):
    real = common.load_dataset

    def first(name, split='train', *args, **kwargs):
        x, y = real(name, split, *args, **kwargs)
        return x[:N_TRAIN], (y[:N_TRAIN] if y is not None else None)
    monkeypatch.setattr(common, 'load_dataset', first)


@pytest.fixture(scope='module')
def stage1(tmp_path_factory):
    """A tiny trained ldm.py run (and its autoencoder, trained by ldm.py itself)."""
    out = tmp_path_factory.mktemp('ldm')
    with pytest.MonkeyPatch.context() as mp:
        real = common.load_dataset
        mp.setattr(common, 'load_dataset', lambda n, s='train', *a, **k: tuple(
            v[:N_TRAIN] if v is not None else None for v in real(n, s, *a, **k)))
        ldm.main(TINY + ['--out', str(out / 'run'), '--vae', str(out / 'vae' / 'ckpt.pt'), '--vae-args', VAE_ARGS,
                         '--steps', '3'])
    return out


def test_z0_and_eps_from_v_invert_the_v_definition():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 5, 4, 7, 7, dtype=torch.float64, generator=g)
    for ab in (0.999, 0.5, 1e-3):
        ab = torch.tensor(ab, dtype=torch.float64)
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        zt, v = a * z0 + s * eps, a * eps - s * z0  # eq. (4) and Salimans & Ho's v, written out here
        z0_hat = ddpm.predict_x0(zt, v, ab, 'v')  # the inverse rotation of the comment in ldm.py
        eps_hat = ddpm.predict_eps(zt, z0_hat, ab)
        torch.testing.assert_close(z0_hat, z0, atol=1e-12, rtol=0)
        torch.testing.assert_close(eps_hat, eps, atol=1e-12, rtol=0)


def test_ddim_step_with_the_true_v_retraces_the_forward_process():
    ab = ddpm.make_alpha_bar('cosine', 50)
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(2, 3, 4, 7, 7, generator=g)

    def oracle(z, t, y=None):  # the v a perfect network would output for this (z0, eps)
        a = ab[t].float().view(-1, 1, 1, 1)
        return a.sqrt() * eps - (1 - a).sqrt() * z0

    ts = [0, 3, 10, 20, 35, 49]
    snaps = []
    zT = (ab[49].sqrt() * z0 + (1 - ab[49]).sqrt() * eps).float()
    z = ddim.ddim_sample(oracle, zT, ts, ab, 0.0, 'v', 0, snapshots=snaps)  # ldm.py's DDIM in latent space
    for snap, t in zip(snaps, reversed(ts)):  # snapshot k holds z at ts[-1-k]
        torch.testing.assert_close(snap, (ab[t].sqrt() * z0 + (1 - ab[t]).sqrt() * eps).float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(z, z0, atol=1e-4, rtol=0)


def test_scale_factor_makes_the_latents_unit_variance(stage1):
    ckpt = torch.load(stage1 / 'run' / 'ckpt.pt', weights_only=True)
    ae, _ = vae.load_autoencoder(stage1 / 'vae' / 'ckpt.pt')
    x = common.load_dataset('mnist', 'train')[0]
    with torch.no_grad():
        z = ae.encode(x.float() / 127.5 - 1)  # encoded here, not read from ldm.py's cache
    assert ckpt['scale'] != 1 and abs((z * ckpt['scale']).std().item() - 1) < 1e-4


def test_two_stages_write_checkpoints_grids_and_samples(stage1):
    run = stage1 / 'run'
    curves.main([str(run)])  # the denoiser's loss curve
    assert (stage1 / 'vae' / 'ckpt.pt').exists() and (run / 'ckpt.pt').exists() and (run / 'curves.png').exists()
    assert Image.open(run / 'samples_0000003.png').size == (8 * 30 + 2, 8 * 30 + 2)  # 64 decoded 28x28 samples
    cache = list(common.cache_dir().glob('ldm-latents-mnist-*.pt'))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    ldm.main(TINY + ['--out', str(stage1 / 'run2'), '--vae', str(stage1 / 'vae' / 'ckpt.pt'), '--steps', '1'])
    assert cache[0].stat().st_mtime_ns == stamp  # the second run reused the cached latents
    good = cache[0].read_bytes()
    cache[0].write_bytes(good[:1000])
    with pytest.raises(SystemExit, match='is not a readable latent cache: delete it'):
        ldm.main(TINY + ['--out', str(stage1 / 'run3'), '--vae', str(stage1 / 'vae' / 'ckpt.pt'), '--steps', '1'])
    cache[0].write_bytes(good)
    ldm.main(['--device', 'cpu', '--mode', 'sample', '--out', str(run), '--n-samples', '5', '--sample-batch', '2',
              '--sampler', 'ddpm', '--sample-steps', '4', '--clip-limit', '3'])
    x = np.load(run / 'samples.npz')['arr_0']
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8 and x.std() > 0
    assert len(list((run / 'samples').glob('*.png'))) == 5 and (run / 'samplers.png').exists()


def test_resume_is_bit_identical(stage1, tmp_path):
    base = TINY + ['--vae', str(stage1 / 'vae' / 'ckpt.pt'), '--dropout', '0.1']
    _, loss_a = ldm.main(base + ['--out', str(tmp_path / 'a'), '--steps', '4'])
    ldm.main(base + ['--out', str(tmp_path / 'b'), '--steps', '3'])
    _, loss_b = ldm.main(base + ['--out', str(tmp_path / 'b'), '--steps', '4', '--resume', '1'])
    assert loss_a == loss_b
    a, b = (torch.load(tmp_path / p / 'ckpt.pt', weights_only=True) for p in 'ab')
    for key in ('model', 'ema'):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a['scale'] == b['scale']


def test_wrong_autoencoder_gets_one_clear_error(stage1, tmp_path):
    vae.main(['--dataset', 'mnist', '--arch', 'mlp', '--device', 'cpu', '--steps', '1', '--eval-n', '4',
              '--eval-k', '2', '--out', str(tmp_path / 'mlp')])
    with pytest.raises(SystemExit, match=r'--arch mlp model of mnist; ldm.py needs the spatial autoencoder'):
        ldm.main(TINY + ['--out', str(tmp_path / 'x'), '--vae', str(tmp_path / 'mlp' / 'ckpt.pt')])
    with pytest.raises(SystemExit, match=r'model of mnist; ldm.py needs .* of fashion-mnist'):
        ldm.main(TINY + ['--dataset', 'fashion-mnist', '--out', str(tmp_path / 'y'),
                         '--vae', str(stage1 / 'vae' / 'ckpt.pt')])
    with pytest.raises(SystemExit, match='was not written by vae'):
        ldm.main(TINY + ['--out', str(tmp_path / 'z'), '--vae', str(stage1 / 'run' / 'ckpt.pt')])
    ckpt = torch.load(stage1 / 'run' / 'ckpt.pt', weights_only=True)
    (tmp_path / 'moved').mkdir()
    torch.save(dict(ckpt, vae=str(tmp_path / 'gone.pt')), tmp_path / 'moved' / 'ckpt.pt')
    with pytest.raises(SystemExit, match='gone.pt, which is missing'):  # not a silently retrained autoencoder
        ldm.main(['--device', 'cpu', '--mode', 'sample', '--out', str(tmp_path / 'moved'), '--sample-steps', '3'])
    torch.save(dict(ckpt, vae=str(tmp_path / 'mlp' / 'ckpt.pt')), tmp_path / 'moved' / 'ckpt.pt')
    with pytest.raises(SystemExit, match='--arch mlp model'):
        ldm.main(['--device', 'cpu', '--mode', 'sample', '--out', str(tmp_path / 'moved'), '--sample-steps', '3'])


@pytest.mark.parametrize('args, message', [(['--sampler', 'euler'], "--sampler 'euler' is not one of"),
                                           (['--label', '7'], 'need --cond class'),
                                           (['--sample-steps', '50'], '--sample-steps 50 must be at most T = 20'),
                                           (['--clip-limit', '-1'], '--clip-limit -1.0 must be >= 0')])
def test_bad_flags_get_one_clear_error(args, message):
    with pytest.raises(SystemExit, match=message):
        ldm.main(TINY + args)


def test_cross_attention_shapes_and_gradients_reach_the_context():
    torch.manual_seed(0)
    xa = ddpm.CrossAttention(8, 16)
    torch.nn.init.normal_(xa.proj.weight)  # zero at init (identity block): give the branch a non-zero output layer
    h, context = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 3, 16, requires_grad=True)
    out = xa(h, context)
    assert out.shape == h.shape
    out.square().sum().backward()
    assert context.grad.shape == (2, 3, 16) and context.grad.abs().min() > 0

    cfg = ldm.Config(ch=8, attn_res='4', cond='class')
    net = ldm.LatentUNet(cfg, (4, 7, 7))
    xattn = [m for m in net.modules() if isinstance(m, ddpm.CrossAttention)]
    assert len(xattn) == 6  # the 4x4 level: 2 blocks down, 3 up, and the middle block's attention
    for m in xattn:
        assert not m.proj.weight.any() and not m.proj.bias.any()  # each added block starts as the identity
        torch.nn.init.normal_(m.proj.weight, std=0.1)
    torch.nn.init.normal_(net.unet.conv_out.weight, std=0.1)
    y = torch.tensor([7, 7, 10])
    out = net(torch.randn(3, 4, 7, 7), torch.tensor([5, 9, 13]), y)
    assert out.shape == (3, 4, 7, 7)
    out.square().sum().backward()
    grad = net.tokens.weight.grad.abs().sum(1)
    assert grad[7] > 0 and grad[10] > 0 and grad[:7].sum() == 0  # the embeddings of the labels used, and only those


def test_class_conditional_run_samples_a_label_with_guidance(stage1, tmp_path):
    ldm.main(TINY + ['--out', str(tmp_path), '--vae', str(stage1 / 'vae' / 'ckpt.pt'), '--steps', '2',
                     '--cond', 'class'])
    ldm.main(['--device', 'cpu', '--mode', 'sample', '--out', str(tmp_path), '--n-samples', '3', '--label', '7',
              '--guidance', '3', '--save', 'npz', '--sample-steps', '3'])
    assert np.load(tmp_path / 'samples.npz')['arr_0'].shape == (3, 28, 28, 1)
    ldm.main(['--device', 'cpu', '--mode', 'reimagine', '--out', str(tmp_path), '--sample-steps', '3'])
    ldm_schedules.main(['--device', 'cpu', '--out', str(tmp_path)])  # the exercise figures: class-conditional too
    import bench
    bench.main(['ldm', '--device', 'cpu', '--out', str(tmp_path), '--sample-steps', '3', '--batch-size', '8',
                '--sample-batch', '4'])
    assert Image.open(tmp_path / 'reimagine.png').size == (7 * 30 + 2, 16 * 30 + 2)  # 4 images x 4 levels, 7 columns
    assert Image.open(tmp_path / 'schedules_T10.png').size == (11 * 30 + 2, 2 * 30 + 2)


def test_fid_during_training_scores_decoded_uint8_samples(stage1, tmp_path, monkeypatch):
    import eval_fid
    seen = []

    class FakeScorer:  # the Inception network is eval_fid.py's business (tests/test_fid.py); here only the plumbing
        def __init__(self, ref, device, **kwargs):
            seen.append(ref)

        def __call__(self, x):
            seen.append((x.dtype, tuple(x.shape)))
            return 12.5
    monkeypatch.setattr(eval_fid, 'Scorer', FakeScorer)
    ldm.main(TINY + ['--out', str(tmp_path), '--vae', str(stage1 / 'vae' / 'ckpt.pt'), '--steps', '2',
                     '--fid-every', '1', '--fid-samples', '5', '--sample-batch', '2'])
    assert seen == ['mnist:train'] + [(torch.uint8, (5, 1, 28, 28))] * 2  # after steps 1 and 2
    assert 'step 2 | fid5 12.5000' in (tmp_path / 'log.txt').read_text()


def test_sigterm_saves_a_checkpoint_and_resume_continues(stage1, tmp_path):
    step = sigterm_run('ldm.py', TINY + ['--out', tmp_path, '--vae', stage1 / 'vae' / 'ckpt.pt', '--steps', '100000',
                                         '--ckpt-every', '100000'], tmp_path)  # reuses the tiny autoencoder's latents
    assert step >= 3
    ldm.main(TINY + ['--out', str(tmp_path), '--vae', str(stage1 / 'vae' / 'ckpt.pt'), '--steps', str(step + 1),
                     '--resume', '1'])
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == step + 1


def test_test_images_and_labels_land_on_the_device():
    # reimagine once moved the labels to x.device before x had moved (a crash on CUDA that no CPU run shows); the meta
    # device shows where each tensor went without a GPU
    for cond, label in (('class', -1), ('class', 7), ('none', -1)):
        x, y = ldm.test_images(ldm.Config(cond=cond, label=label), 3, 'meta')
        assert x.device.type == 'meta' and x.shape == (3, 1, 28, 28)
        assert (y is None) == (cond == 'none') and (y is None or (y.device.type == 'meta' and y.shape == (3,)))


def test_the_race_trains_pixels_on_the_ldm_recipe_for_its_seconds(tmp_path, monkeypatch):
    import eval_fid
    from exercises import ldm_race
    scored = []
    slow_fid = lambda x: time.sleep(0.5) or scored.append(tuple(x.shape)) or 1.0  # 170 ms per image if it were timed
    monkeypatch.setattr(eval_fid, 'Scorer', lambda ref, device: slow_fid)
    ldm_race.main(['--device', 'cpu', '--out', str(tmp_path), '--fid-samples', '3', '--sample-steps', '2',
                   '--ldm', f'--ch 8 --steps 2 --T 20 --log-every 1 --vae-args "{VAE_ARGS}"',
                   '--pixel', '--ch 8 --T 20'])
    ckpts = {k: torch.load(tmp_path / k / 'ckpt.pt', weights_only=True) for k in ('ae', 'ldm', 'pixel-s2', 'pixel-all')}
    t_ae, t_s2 = ckpts['ae']['clock'], ckpts['ldm']['clock']
    for name, budget in (('pixel-s2', t_s2), ('pixel-all', t_ae + t_s2)):  # each stops at its budget, not before
        cfg = ckpts[name]['config']
        assert cfg['time_budget'] == pytest.approx(budget, abs=0.06) and ckpts[name]['clock'] >= cfg['time_budget']
        assert (cfg['schedule'], cfg['objective'], cfg['attn_res'], cfg['batch_size']) == ('cosine', 'v', '7', 128)
    assert scored == [(3, 1, 28, 28)] * 6  # three models, two samplers each
    table = (tmp_path / 'race.md').read_text()
    assert all(int(ms) < 100 for ms in re.findall(r'\((\d+) ms/image\)', table))  # the FID's time is not sampling's
    assert table.count('| pixel-') == 2 and 'the LDM\'s U-Net on 28x28 pixels' in table
