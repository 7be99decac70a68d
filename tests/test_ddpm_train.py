"""ddpm.py end to end on CPU with a tiny U-Net: train, sample, resume exactly, survive a kill, DDP, figures."""
import math, os, signal, socket
from functools import partial

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from helpers import sigterm_run
import common
import ddpm
from exercises import denoise, forward, schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--dataset', 'mnist', '--device', 'cpu', '--ch', '8', '--ch-mult', '1,2', '--num-res-blocks', '1',
        '--attn-res', '14', '--T', '20', '--batch-size', '8', '--log-every', '1', '--sample-every', '0']


def run(tmp_path, *args):
    return ddpm.main(TINY + ['--out', str(tmp_path)] + list(args))


def test_train_then_sample_writes_grid_checkpoint_and_npz(tmp_path):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run(tmp_path, '--steps', '3')
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # Ctrl-C works again
    assert (tmp_path / 'ckpt.pt').exists() and (tmp_path / 'config.json').exists()
    grid = Image.open(tmp_path / 'samples_0000003.png')
    assert grid.size == (8 * 30 + 2, 8 * 30 + 2)  # 64 samples of 28x28, 2-pixel padding
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 3 and ckpt['config']['ch'] == 8
    run(tmp_path, '--mode', 'sample', '--n-samples', '5', '--sample-batch', '2')
    x = np.load(tmp_path / 'samples.npz')['arr_0']
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8 and x.std() > 0
    assert len(list((tmp_path / 'samples').glob('*.png'))) == 5
    assert Image.open(tmp_path / 'reverse.png').size == (5 * 30 + 2, 8 * 30 + 2)  # 8 rows x 5 snapshots


def test_resume_is_bit_identical(tmp_path):
    model_a, loss_a = run(tmp_path / 'a', '--steps', '4', '--dropout', '0.1')
    run(tmp_path / 'b', '--steps', '3', '--dropout', '0.1')  # "interrupted" after step 3
    model_b, loss_b = run(tmp_path / 'b', '--steps', '4', '--dropout', '0.1', '--resume', '1')
    assert loss_a == loss_b  # the next-step loss, bit for bit
    a, b = (torch.load(p / 'ckpt.pt', weights_only=True) for p in (tmp_path / 'a', tmp_path / 'b'))
    for key in ('model', 'ema'):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a['opt']['state'][0]['exp_avg_sq'].equal(b['opt']['state'][0]['exp_avg_sq'])


def test_resume_refuses_a_different_model(tmp_path):
    run(tmp_path, '--steps', '1')
    with pytest.raises(SystemExit, match='different ch'):
        run(tmp_path, '--steps', '2', '--ch', '16', '--resume', '1')
    with pytest.raises(SystemExit, match='--resume 1 to continue'):
        run(tmp_path, '--steps', '2')


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    step = sigterm_run('ddpm.py', TINY + ['--out', tmp_path, '--steps', '100000', '--ckpt-every', '100000'], tmp_path)
    assert step >= 3
    run(tmp_path, '--steps', str(step + 1), '--resume', '1')
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == step + 1


def _ddp_worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = common.parse_config(ddpm.Config, ddpm.PRESETS, None, TINY + ['--out', out, '--steps', '3', '--dropout', '0.1'])
    batches, real = [], common.random_batch

    def recorded(*args):
        xb, yb = real(*args)
        batches.append(xb)
        return xb, yb
    common.random_batch = recorded
    model, _ = ddpm.train(cfg)
    torch.save(torch.stack(batches), os.path.join(out, f'batches{rank}.pt'))
    torch.save(model.state_dict(), os.path.join(out, f'rank{rank}.pt'))
    x = common.sample_many(partial(ddpm.draw, model.eval(), cfg, (1, 28, 28)), 5, 2, cfg.seed, 'cpu', rank, 2)
    if rank == 0:  # 3 batches of 2, 2, 1 images, sampled by ranks 0, 1, 0 and gathered back in order
        torch.save(x, os.path.join(out, 'samples.pt'))
    torch.distributed.barrier()  # as ddpm.main does: no rank tears down while another still works
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_keep_replicas_identical(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    b0, b1 = (torch.load(tmp_path / f'batches{r}.pt', weights_only=True) for r in (0, 1))
    assert b0.shape == (3, 4, 1, 28, 28) and all(not torch.equal(a, b) for a, b in zip(b0, b1))  # each rank its own
    cfg = common.parse_config(ddpm.Config, ddpm.PRESETS, None, TINY)
    init = ddpm.make_model(cfg, 1, 28).state_dict()
    assert any(not torch.equal(r0[k], init[k]) for k in r0)  # it trained ...
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # ... and the ranks, fed different batches, agree exactly
    model = ddpm.make_model(cfg, 1, 28)
    model.load_state_dict(r0)
    single = common.sample_many(partial(ddpm.draw, model.eval(), cfg, (1, 28, 28)), 5, 2, cfg.seed, 'cpu')
    assert torch.equal(torch.load(tmp_path / 'samples.pt'), single)


def test_class_conditional_training_and_guided_sampling(tmp_path):
    run(tmp_path, '--steps', '2', '--class-cond', '1')
    run(tmp_path, '--mode', 'sample', '--n-samples', '4', '--label', '7', '--guidance', '3', '--save', 'npz')
    assert np.load(tmp_path / 'samples.npz')['arr_0'].shape == (4, 28, 28, 1)


def test_figures(tmp_path, capsys):
    schedules.main(['--out', str(tmp_path), '--T', '1000'])
    text = capsys.readouterr().out
    assert 'linear   SNR(t) = 1 at t = ' in text
    rows = (tmp_path / 'schedules.csv').read_text().splitlines()
    assert len(rows) == 1001 and rows[0].startswith('t,beta_linear,alpha_bar_linear,snr_linear')
    forward.main(['--dataset', 'mnist', '--out', str(tmp_path), '--T', '1000'])
    lines = (tmp_path / 'forward.csv').read_text().splitlines()
    mse = [float(r.split(',')[2]) for r in lines[1:]]
    assert [int(r.split(',')[0]) for r in lines[1:]] == [0, 100, 250, 500, 750, 999]
    assert mse[0] == 0 and all(a < b for a, b in zip(mse, mse[1:]))  # x_t drifts away from x_0 as t grows
    assert Image.open(tmp_path / 'forward.png').size[0] > 6 * 100  # six labelled panels


@pytest.mark.parametrize('args, message', [
    (['--schedule', 'quadratic'], 'is not one of: linear, cosine, sigmoid'),
    (['--dataset', 'imagenet'], "unknown dataset 'imagenet'"),
    (['--ch-mult', '1,2,2,2,2'], 'cannot be halved'),
    (['--mode', 'sample'], 'no checkpoint at'),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, '--steps', '1', *args)


def test_fid_during_training_is_logged(tmp_path, monkeypatch):
    import eval_fid

    weights = common.data_dir() / 'weights' / 'pt_inception-2015-12-05-nofc.pth'
    monkeypatch.setenv('FID_WEIGHTS', str(weights))
    real = common.load_dataset('mnist', 'test')[0][:6]  # a 6-image reference keeps the Inception on CPU cheap
    monkeypatch.setattr(eval_fid, 'reference_stats',
                        lambda spec, mode, model: eval_fid.stats_of(eval_fid.compute_features(real, model=model)))
    run(tmp_path, '--steps', '2', '--fid-every', '2', '--fid-samples', '4')
    line = (tmp_path / 'log.txt').read_text().splitlines()[-1]
    assert line.startswith('step 2 | fid4 ') and float(line.split()[-1]) > 0


def test_bench_prints_throughput_and_flops(capsys):
    import bench
    bench.main(['ddpm'] + TINY)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(line.split(' GFLOP/step')[0]) > 0 and float(line.split(' img/s')[0].split('| ')[-1]) > 0


def test_denoise_psnr_and_blur_by_hand():
    """PSNR on [0, 1] of [-1, 1] images: an error of 0.2 on [-1, 1] is 0.1 on [0, 1], MSE 0.01, 20 dB; the blur keeps
    a flat background and spreads a point by its Gaussian."""
    ref = torch.zeros(3, 1, 8, 8)
    assert denoise.psnr(ref + 0.2, ref) == pytest.approx(20.0, abs=1e-4)
    assert denoise.psnr(ref + 5, ref) == pytest.approx(denoise.psnr(ref + 1, ref))  # clipped to [-1, 1] first
    flat = torch.full((1, 1, 9, 9), -1.0)
    torch.testing.assert_close(denoise.blur(flat, 1.0), flat)
    point = flat.clone()
    point[0, 0, 4, 4] = 1.0
    b = denoise.blur(point, 1.0) + 1  # the point's excess, 2, spread by a Gaussian of std 1
    assert b.sum().item() == pytest.approx(2.0, abs=1e-3)
    assert b[0, 0, 4, 5] / b[0, 0, 4, 4] == pytest.approx(math.exp(-0.5), rel=1e-3)


def test_denoise_exercise_trains_and_beats_the_noisy_input(tmp_path):
    result = denoise.main(['--device', 'cpu', '--ch', '8', '--steps', '30', '--batch-size', '16', '--lr', '3e-3',
                           '--log-every', '10', '--eval-images', '200', '--out', str(tmp_path)])
    blur = next(v for k, v in result.items() if k.startswith('Gaussian'))
    assert result['noisy'] == pytest.approx(14.5, abs=0.6)  # sigma 0.25 on [0, 1] where unclipped: 12 dB, clipped more
    assert blur > result['noisy'] + 3 and result['U-Net'] > result['noisy'] + 3, result
    assert (tmp_path / 'denoise.png').exists() and 'U-Net' in (tmp_path / 'denoise.txt').read_text()
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 30
