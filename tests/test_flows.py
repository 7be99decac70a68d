"""flows.py: exact inverses and log-determinants, bits/dim by hand, the moons density, train/resume/sample, errors."""
import math, os, signal, socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from helpers import sigterm_run
import flows
from exercises import moons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--dataset', 'mnist', '--device', 'cpu', '--ch', '8', '--blocks', '1', '--scales', '2', '--batch-size', '8',
        '--log-every', '1', '--eval-images', '16', '--sample-batch', '8']


def run(tmp_path, *args):
    return flows.main(TINY + ['--out', str(tmp_path)] + list(args))


def config(*args):
    return flows.common.parse_config(flows.Config, flows.PRESETS, None, TINY + list(args))


def randomised(flow, std=0.3):
    """The flow with every parameter random, so no layer is the identity it starts as."""
    torch.manual_seed(1)
    for p in flow.parameters():
        p.data = torch.randn_like(p) * std
    return flow


def image_layers():
    cfg = config('--ch', '4')
    flow = randomised(flows.make_flow(cfg, (1, 4, 4)))
    return [layer for scale in flow.scales for layer in scale], flow


def test_inverse_of_forward_is_identity_for_every_layer_and_the_flow():
    torch.manual_seed(0)
    layers, flow = image_layers()
    x = torch.randn(5, 1, 4, 4)
    h = x
    for layer in layers[:7]:  # the first scale; the others see other shapes
        y, _ = layer(h)
        torch.testing.assert_close(layer.inverse(y), h, atol=1e-5, rtol=1e-5)
        h = y
    zs, _ = flow(x)
    assert sum(z[0].numel() for z in zs) == 16
    torch.testing.assert_close(flow.inverse(zs), x, atol=1e-5, rtol=1e-5)
    moons_flow = randomised(moons.make_flow(moons.Config(ch=16, blocks=2)))
    x2 = torch.randn(100, 2)
    torch.testing.assert_close(moons_flow.inverse(moons_flow(x2)[0]), x2, atol=1e-5, rtol=1e-5)
    pixels = torch.rand(5, 1, 4, 4) * 256  # the logit pre-processing, undone as sample() does
    y, _ = flows.logit_preprocess(pixels, 0.05)
    torch.testing.assert_close((torch.sigmoid(y) - 0.05) / 0.9 * 256, pixels, atol=1e-3, rtol=1e-5)


def slogdet_of_jacobian(f, x):
    """log|det J| of f: (1, ...) -> flat outputs at x, by autograd and torch.linalg.slogdet."""
    J = torch.autograd.functional.jacobian(lambda v: f(v.view(x.shape)).flatten(), x.flatten())
    return torch.linalg.slogdet(J)[1]


def test_logdet_equals_slogdet_of_the_autograd_jacobian():
    torch.set_default_dtype(torch.float64)
    try:
        layers, flow = image_layers()
        x = torch.randn(1, 1, 4, 4)
        act, coupling, squeeze = layers[0], layers[1], layers[6]
        for layer in (act, coupling, layers[3], squeeze):  # act-norm, both checkerboard parities, squeeze
            torch.testing.assert_close(layer(x)[1][0], slogdet_of_jacobian(lambda v: layer(v)[0], x))
        xc = torch.randn(1, 4, 2, 2)
        channel = layers[8]  # a channel-wise coupling after the squeeze
        torch.testing.assert_close(channel(xc)[1][0], slogdet_of_jacobian(lambda v: channel(v)[0], xc))
        whole = lambda v: torch.cat([z.flatten(1) for z in flow(v)[0]], 1)
        torch.testing.assert_close(flow(x)[1][0], slogdet_of_jacobian(whole, x))
        pixels = torch.rand(1, 1, 4, 4) * 256
        torch.testing.assert_close(flows.logit_preprocess(pixels, 0.05)[1][0],
                                   slogdet_of_jacobian(lambda v: flows.logit_preprocess(v, 0.05)[0], pixels))
    finally:
        torch.set_default_dtype(torch.float32)


def test_identity_flow_reports_the_bits_per_dim_computed_by_hand():
    cfg = config('--sample-batch', '3')
    a = cfg.alpha
    assert a == 1e-6  # MNIST's preset
    flow = flows.make_flow(cfg, (1, 28, 28))  # zero last layers and act-norm before its data init: f(y) = y
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    x[0], x[1] = 0, 255  # an all-black and an all-white image
    reported = flows.bits_per_dim(flow, x, cfg.alpha, cfg.sample_batch)
    # by hand, in float64, with the documented noise (one generator per batch of --sample-batch images)
    u = torch.cat([torch.rand(x[i:i + 3].shape, generator=torch.Generator().manual_seed(i)) for i in (0, 3)])
    p = a + (1 - 2 * a) * (x.double() + u.double()) / 256  # pixel value -> (alpha, 1 - alpha)
    y = torch.log(p / (1 - p))
    log_normal = -0.5 * y ** 2 - 0.5 * math.log(2 * math.pi)  # N(0, 1) density of each z_d = y_d
    log_dy_dx = math.log((1 - 2 * a) / 256) - torch.log(p * (1 - p))  # dlogit(p)/dp = 1/(p(1-p)), dp/dx = (1-2a)/256
    by_hand = -(log_normal + log_dy_dx).sum((1, 2, 3)) / (784 * math.log(2))
    assert reported == pytest.approx(by_hand.mean().item(), rel=1e-5)
    assert 4 < by_hand.mean() < 40  # an untrained flow: bits per pixel, not nats per image (~20,000)


def test_logit_preprocess_keeps_fp32_accuracy_next_to_white_at_small_alpha():
    x = torch.tensor([[0.0, 1e-4, 128.5, 255.5, 255.99, 255.9999]])  # fp32; p lands within 1e-6 of 1 for the last
    y, logdet = flows.logit_preprocess(x, 1e-6)
    y64, logdet64 = flows.logit_preprocess(x.double(), 1e-6)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-4)
    torch.testing.assert_close(logdet.double(), logdet64, rtol=0, atol=1e-4)


def test_moons_density_integrates_to_one(tmp_path):
    flow = moons.main(['--device', 'cpu', '--ch', '32', '--steps', '200', '--log-every', '100', '--out', str(tmp_path)])
    p, area = moons.density_grid(flow, (-4, 5, -4, 4), 400)
    assert p.sum().item() * area == pytest.approx(1.0, abs=0.01)
    log = (tmp_path / 'log.txt').read_text()
    assert 'test nats' in log and 'mass off the moons' in log and (tmp_path / 'moons.png').exists()


def test_moons_distance_is_zero_on_the_arcs_and_large_in_the_gap():
    g = torch.Generator().manual_seed(0)
    assert moons.moons_distance(moons.two_moons(1000, g, noise=0)).max() < 1e-5
    assert (moons.moons_distance(moons.two_moons(20000, g)) > 0.25).float().mean() < 1e-3  # 5 sigma of the noise
    # the middle of the gap; the upper arc's centre (nearest the lower arc); beside and below the upper arc's left end
    x = torch.tensor([[0.5, 0.25], [0.0, 0.0], [-1.5, 0.0], [-1.0, -0.5]])
    torch.testing.assert_close(moons.moons_distance(x), torch.tensor([1 - 0.3125 ** 0.5, 1.25 ** 0.5 - 1, 0.5, 0.5]))


def test_train_then_sample_writes_grids_checkpoint_and_npz(tmp_path):
    run(tmp_path, '--steps', '3')
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 3 and ckpt['config']['ch'] == 8
    for T in ('1.0', '0.7'):
        assert Image.open(tmp_path / f'samples_T{T}.png').size == (8 * 30 + 2, 8 * 30 + 2)
    last = (tmp_path / 'log.txt').read_text().splitlines()[-1]
    assert last.startswith('step 3 | test bits/dim ') and '(16 test images)' in last
    run(tmp_path, '--mode', 'sample', '--n-samples', '5', '--temperature', '0.7')
    x = np.load(tmp_path / 'samples_T0.7.npz')['arr_0']
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8 and x.std() > 0


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    _, loss_a = run(tmp_path / 'a', '--steps', '4')
    nll, calls = flows.nll, []

    def ctrl_c_in_step_3(*args):  # a real SIGINT while step 3 computes its loss: the step completes, then it stops
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return nll(*args)
    with monkeypatch.context() as m:  # run b is interrupted after step 3 of 4 (the lr schedule depends on --steps)
        m.setattr(flows, 'nll', ctrl_c_in_step_3)
        with pytest.raises(SystemExit, match='130'):
            run(tmp_path / 'b', '--steps', '4')
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['step'] == 3
    _, loss_b = run(tmp_path / 'b', '--steps', '4', '--resume', '1')
    assert loss_a == loss_b  # the next-step loss, bit for bit
    a, b = (torch.load(p / 'ckpt.pt', weights_only=True) for p in (tmp_path / 'a', tmp_path / 'b'))
    for name in a['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name
    assert a['opt']['state'][0]['exp_avg_sq'].equal(b['opt']['state'][0]['exp_avg_sq'])
    run(tmp_path / 'b', '--steps', '4', '--resume', '1')  # already there: nothing to train, no crash


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    nll, calls = flows.nll, []

    def poisoned(*args):
        calls.append(1)
        return nll(*args) * (float('nan') if len(calls) == 2 else 1.0)

    monkeypatch.setattr(flows, 'nll', poisoned)
    with pytest.raises(SystemExit, match='loss is nan at step 2: the last good checkpoint'):
        run(tmp_path, '--steps', '3', '--ckpt-every', '1')
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 1


@pytest.mark.parametrize('args, message', [
    (['--alpha', '0.6'], r'--alpha 0.6 must be in \(0, 0.5\)'),
    (['--scales', '4'], 'cannot be squeezed 3 times'),
    (['--mode', 'generate'], 'is not one of: train, sample'),
    (['--dataset', 'imagenet'], "unknown dataset 'imagenet'"),
    (['--mode', 'sample'], 'no checkpoint at'),
    (['--batch-size', '0'], '--batch-size 0 must be > 0'),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, '--steps', '1', *args)


def test_resume_refuses_a_different_model_and_a_fresh_run_refuses_a_used_folder(tmp_path):
    run(tmp_path, '--steps', '1')
    with pytest.raises(SystemExit, match='different ch'):
        run(tmp_path, '--steps', '2', '--ch', '16', '--resume', '1')
    with pytest.raises(SystemExit, match='--resume 1 to continue'):
        run(tmp_path, '--steps', '2')


def _ddp_worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    flow, _ = flows.train(config('--out', out, '--steps', '3'))
    torch.save(flow.state_dict(), os.path.join(out, f'rank{rank}.pt'))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_keep_replicas_identical(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    init = flows.make_flow(config(), (1, 28, 28)).state_dict()
    assert any(not torch.equal(r0[k], init[k]) for k in r0)  # it trained ...
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # ... and the ranks, fed different batches, agree exactly
    assert 'test bits/dim' in (tmp_path / 'log.txt').read_text()


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    step = sigterm_run('flows.py', TINY + ['--out', tmp_path, '--steps', '100000', '--ckpt-every', '100000'], tmp_path)
    assert step >= 3
    run(tmp_path, '--steps', str(step + 1), '--resume', '1')
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == step + 1


def test_fid_of_samples_is_logged(tmp_path, monkeypatch):
    import eval_fid
    seen = []

    class Scorer:  # eval_fid.Scorer's interface: Scorer('<dataset>:train', device)(uint8 (N, C, H, W)) -> FID
        def __init__(self, ref, device, images=None):
            assert ref == 'mnist:train' and images is None

        def __call__(self, x):
            seen.append(x)
            return 12.5

    monkeypatch.setattr(eval_fid, 'Scorer', Scorer, raising=False)
    run(tmp_path, '--steps', '2', '--fid-every', '1', '--fid-samples', '10')
    assert len(seen) == 2 and seen[0].shape == (10, 1, 28, 28) and seen[0].dtype == torch.uint8
    lines = (tmp_path / 'log.txt').read_text().splitlines()
    assert lines[-1].startswith('step 2 | test bits/dim ') and lines[-1].endswith('| fid10 12.5000')
