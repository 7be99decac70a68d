"""pixelcnn.py: the receptive field is exactly the raster-order past (no blind spot), p(x) sums to 1 over every image,
the sampler draws from p(x), NLL constants, train/resume/sample/eval, errors."""
import itertools, math

import numpy as np
import pytest
import torch

from helpers import ctrl_c_on_call, sigterm_run
import pixelcnn, vae

TINY = ['--dataset', 'mnist', '--device', 'cpu', '--ch', '8', '--layers', '2', '--kernel', '3', '--batch-size', '8',
        '--log-every', '1', '--eval-images', '16', '--sample-batch', '8']


def run(tmp_path, *args):
    return pixelcnn.main(TINY + ['--out', str(tmp_path)] + list(args))


def randomised(model, std=0.5, seed=1):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.data = torch.randn_like(p) * std
    return model


@pytest.mark.parametrize('class_cond', [False, True])
def test_each_output_depends_on_exactly_the_pixels_before_it_in_raster_order(class_cond):
    """d logit(i, j) / d x is nonzero at every pixel before (i, j) and zero at (i, j) and after: causal, and with enough
    layers for the image, no blind spot (the single-stack PixelCNN misses the pixels up and to the right)."""
    H = W = 6
    model = randomised(pixelcnn.PixelCNN(4, 6, 3, 1, 10 * class_cond)).double()
    y = torch.tensor([3]) if class_cond else None
    for i, j in itertools.product(range(H), range(W)):
        x = torch.randn(1, 1, H, W, dtype=torch.float64, requires_grad=True)
        model(x, y)[0, 0, i, j].backward()
        seen = x.grad[0, 0] != 0
        before = torch.arange(H * W).view(H, W) < i * W + j
        assert torch.equal(seen, before), (i, j, seen.int())


@pytest.mark.parametrize('data, shape, levels', [('binary', (1, 2, 2), 2), ('8bit', (1, 1, 2), 256)])
def test_probabilities_of_every_image_sum_to_one(data, shape, levels):
    """exp(-NLL) over all 2^4 binary 2x2 images (all 256^2 8-bit 1x2 images) sums to 1: the conditionals chain into one
    normalised distribution, which no model that peeks at the pixel it predicts (or later ones) does."""
    model = randomised(pixelcnn.PixelCNN(4, 3, 3, levels if levels > 2 else 1))
    x = torch.tensor(list(itertools.product(range(levels), repeat=math.prod(shape)))).view(-1, *shape)
    nll = pixelcnn.nll(model, x, None, data)
    nats = nll if data == 'binary' else nll * math.prod(shape) * math.log(2)  # bits/dim -> nats per image
    assert torch.exp(-nats.double()).sum().item() == pytest.approx(1.0, abs=1e-4)


def test_uniform_model_costs_one_bit_per_binary_pixel_and_eight_per_8bit_pixel():
    for data, out in (('binary', 1), ('8bit', 256)):
        model = pixelcnn.PixelCNN(4, 2, 3, out)
        torch.nn.init.zeros_(model.head[-1].weight), torch.nn.init.zeros_(model.head[-1].bias)
        x = torch.randint(0, 2 if data == 'binary' else 256, (3, 1, 28, 28))
        expected = torch.full((3,), 784 * math.log(2) if data == 'binary' else 8.0)
        torch.testing.assert_close(pixelcnn.nll(model, x, None, data), expected)


def test_sampler_draws_images_with_the_model_probabilities():
    """20,000 samples of 2x2 binary images: the frequency of each of the 16 images matches exp(-NLL)."""
    model = randomised(pixelcnn.PixelCNN(4, 3, 3, 1), std=0.7)
    x = pixelcnn.sample(model, (1, 2, 2), 'binary', -1, 0, 0, 20000, torch.Generator().manual_seed(0))
    assert set(x.unique().tolist()) <= {0, 255}
    images = torch.tensor(list(itertools.product(range(2), repeat=4))).view(-1, 1, 2, 2)
    p = torch.exp(-pixelcnn.nll(model, images, None, 'binary'))
    code = (x.flatten(1) // 255 * torch.tensor([8, 4, 2, 1])).sum(1)  # the raster bits as the index into images
    freq = torch.bincount(code, minlength=16).float() / len(x)
    assert (freq - p).abs().max() < 4 * (0.25 / len(x)) ** 0.5, (freq, p)


def test_class_condition_changes_the_conditionals():
    model = randomised(pixelcnn.PixelCNN(4, 2, 3, 1, 10))
    x = torch.randint(0, 2, (2, 1, 5, 5))
    a, b = (pixelcnn.nll(model, x, torch.tensor([k, k]), 'binary') for k in (1, 7))
    assert (a - b).abs().min() > 1e-3


def test_train_then_sample_and_eval(tmp_path):
    run(tmp_path, '--steps', '3', '--class-cond', '1')
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 3 and ckpt['script'] == 'pixelcnn'
    assert 'test NLL' in (tmp_path / 'log.txt').read_text() and (tmp_path / 'samples.png').exists()
    run(tmp_path, '--mode', 'sample', '--n-samples', '4', '--label', '7')
    x = np.load(tmp_path / 'samples_label7.npz')['arr_0']
    assert x.shape == (4, 28, 28, 1) and x.dtype == np.uint8 and set(np.unique(x)) <= {0, 255}
    run(tmp_path, '--mode', 'eval')
    result = (tmp_path / 'nll.json').read_text()
    assert '"unit": "nats"' in result and '"n_images": 16' in result


def test_binarised_test_set_is_vae_pys():
    """The nats here and vae.py's IWAE bound are of the same binarised test images (seed 0 of the same draw)."""
    cfg = pixelcnn.common.parse_config(pixelcnn.Config, pixelcnn.PRESETS, lambda v: 'mnist', TINY)
    x, _ = pixelcnn.load(cfg, 'test')
    vcfg = vae.Config(eval_n=16, likelihood='bernoulli')
    assert torch.equal(x.float(), (vae.test_set(vcfg, 'cpu') + 1) / 2)


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    args = ['--data', '8bit', '--steps', '4']
    _, loss_a = run(tmp_path / 'a', *args)
    with monkeypatch.context() as m:
        m.setattr(pixelcnn, 'nll', ctrl_c_on_call(pixelcnn.nll, 3))  # in step 3
        with pytest.raises(SystemExit, match='130'):
            run(tmp_path / 'b', *args)
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['step'] == 3
    _, loss_b = run(tmp_path / 'b', *args, '--resume', '1')
    assert loss_a == loss_b
    a, b = (torch.load(p / 'ckpt.pt', weights_only=True) for p in (tmp_path / 'a', tmp_path / 'b'))
    for name in a['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name


@pytest.mark.parametrize('args, message', [
    (['--dataset', 'cifar10-subset'], 'has 3 channels: pixelcnn.py models grayscale'),
    (['--kernel', '4'], '--kernel 4 must be odd'),
    (['--data', 'float'], "--data 'float' is not one of: binary, 8bit"),
    (['--mode', 'sample'], 'no checkpoint at'),
    (['--layers', '0'], '--layers 0 must be > 0'),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, '--steps', '1', *args)


def test_label_without_class_condition_is_refused(tmp_path):
    run(tmp_path, '--steps', '1')
    with pytest.raises(SystemExit, match='no class condition'):
        run(tmp_path, '--mode', 'sample', '--label', '3')


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    step = sigterm_run('pixelcnn.py', TINY + ['--out', tmp_path, '--steps', '100000', '--ckpt-every', '100000'],
                       tmp_path)
    assert step >= 3
    run(tmp_path, '--steps', str(step + 1), '--resume', '1')
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == step + 1
