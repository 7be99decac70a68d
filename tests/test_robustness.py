"""What a run must survive: signals in every phase, divergence, two runs in one folder, stale outputs, resumes at the
end, odd images and caches, and bad flags. Each test was checked to fail on the code before its fix."""
import os, subprocess, sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import sigterm_run
import common
import ddim
import ddpm
import eval_fid
from exercises import ddim_steps, ho_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--dataset', 'mnist', '--device', 'cpu', '--ch', '8', '--ch-mult', '1,2', '--num-res-blocks', '1',
        '--attn-res', '', '--T', '20', '--batch-size', '8', '--log-every', '1', '--sample-every', '0']
WEIGHTS = common.data_dir() / 'weights' / 'pt_inception-2015-12-05-nofc.pth'


def run(out, *args):
    return ddpm.main(TINY + ['--out', str(out)] + list(args))


def test_fid_samples_come_from_the_ema_in_eval_mode(tmp_path, monkeypatch):
    """Dropout must be off whenever the EMA samples: before the first grid, and on every rank."""
    modes = []
    monkeypatch.setattr(eval_fid, 'run_scorer', lambda ref, dataset, x, device: lambda x: 1.0)
    real = ddpm.draw
    monkeypatch.setattr(ddpm, 'draw', lambda model, *a, **k: modes.append(model.training) or real(model, *a, **k))
    run(tmp_path, '--steps', '4', '--fid-every', '2', '--fid-samples', '2', '--dropout', '0.5')
    assert modes == [False, False, False]  # FID samples at steps 2 and 4, and the final grid


def test_resume_of_a_finished_run_says_so(tmp_path, capsys):
    run(tmp_path, '--steps', '2')
    model, loss = run(tmp_path, '--steps', '2', '--resume')  # a bare boolean flag means 1
    assert loss is None and 'already at step 2' in capsys.readouterr().out


def test_resume_with_other_settings_warns(tmp_path, capsys):
    run(tmp_path, '--steps', '1')
    run(tmp_path, '--steps', '2', '--resume', '1', '--seed', '5', '--lr', '3e-4')
    assert 'different seed, lr' in capsys.readouterr().out


def test_fid_of_an_npz_dataset_uses_its_images(tmp_path, monkeypatch):
    monkeypatch.setenv('FID_WEIGHTS', str(WEIGHTS))
    np.savez(tmp_path / 'mine.npz', np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    args = ['--dataset', str(tmp_path / 'mine.npz'), '--steps', '2', '--fid-every', '2', '--fid-samples', '2']
    run(tmp_path / 'run', *args)
    assert (tmp_path / 'run' / 'log.txt').read_text().splitlines()[-1].startswith('step 2 | fid2 ')


def test_sigterm_while_drawing_a_grid_ends_the_run_within_seconds(tmp_path):
    args = TINY + ['--out', tmp_path, '--steps', '3', '--sample-every', '1', '--T', '200000']  # a grid: 200,000 calls
    assert sigterm_run('ddpm.py', args, tmp_path, at='step 1 ', delay=1, wait=10) == 1  # 1 s: inside the first grid


def test_a_diverged_run_keeps_its_last_good_checkpoint(tmp_path, monkeypatch):
    real = ddpm.loss_fn
    calls = []

    def diverging(*a):  # finite for 4 steps, then NaN (logged only every 10 steps, checkpointed every 3)
        calls.append(1)
        return real(*a) * (float('nan') if len(calls) > 4 else 1)
    monkeypatch.setattr(ddpm, 'loss_fn', diverging)
    with pytest.raises(SystemExit, match='loss is nan at step 6'):
        run(tmp_path, '--steps', '9', '--ckpt-every', '3', '--log-every', '10')
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 3 and not common.nonfinite(ckpt)
    ckpt['ema']['conv_in.weight'][0] = float('nan')
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match='hold NaN/inf'):
        run(tmp_path, '--mode', 'sample', '--n-samples', '2')
    with pytest.raises(SystemExit, match='hold NaN/inf'):
        common.save_ckpt(tmp_path / 'other.pt', ckpt)
    assert not (tmp_path / 'other.pt').exists()


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', f'import common, time; common.claim({str(tmp_path)!r}); '
                               f'print("ok", flush=True); time.sleep(60)'], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'ok'
        with pytest.raises(SystemExit, match=f'in use by another run \\(pid {holder.pid}\\)'):
            run(tmp_path, '--steps', '1')
    finally:
        holder.kill()
    holder.wait()
    (tmp_path / 'ckpt.pt.abc.tmp').write_bytes(b'half a checkpoint')  # a write killed midway ...
    run(tmp_path, '--steps', '1')  # ... the lock died with its process; the orphan is cleaned up
    assert not list(tmp_path.glob('*.tmp'))


def test_sampling_again_leaves_no_stale_pngs(tmp_path):
    run(tmp_path, '--steps', '1')
    run(tmp_path, '--mode', 'sample', '--n-samples', '3', '--save', 'png')
    run(tmp_path, '--mode', 'sample', '--n-samples', '2', '--save', 'png')
    assert len(list((tmp_path / 'samples').glob('*.png'))) == 2


def test_a_killed_sampling_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    # a 1,000-step sampler of 2,000 images runs for hours on a CPU: a kill must not lose the batches already drawn
    run(tmp_path, '--steps', '1')
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'ckpt.pt').write_bytes((tmp_path / 'ckpt.pt').read_bytes())
    real, drawn = ddpm.draw, []

    def counting(model, cfg, shape, start, n, generator, snapshots=None):
        if snapshots is None:  # not the reverse-process figure
            drawn.append(start)
            if start == 2 and len(drawn) == 2:
                raise KeyboardInterrupt  # Ctrl-C while the second batch is drawn
        return real(model, cfg, shape, start, n, generator, snapshots)
    monkeypatch.setattr(ddpm, 'draw', counting)
    sample = ['--mode', 'sample', '--n-samples', '5', '--sample-batch', '2', '--save', 'npz']
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *sample)
    assert e.value.code == 130 and len(list(tmp_path.glob('.samples.*/*.pt'))) == 1
    run(tmp_path, *sample)
    assert drawn == [0, 2, 2, 4]  # the second run draws only what the first did not finish
    assert not list(tmp_path.glob('.samples.*'))  # the .npz holds them now
    run(tmp_path / 'b', *sample)  # the same checkpoint, never interrupted
    np.testing.assert_array_equal(np.load(tmp_path / 'samples.npz')['arr_0'],
                                  np.load(tmp_path / 'b' / 'samples.npz')['arr_0'])


def test_kept_batches_serve_only_the_same_command_on_the_same_checkpoint(tmp_path):
    (ckpt := tmp_path / 'ckpt.pt').write_bytes(b'weights')
    keep = common.keep_dir(tmp_path, 'samples_ddim-S10-eta0', ddim.Config(steps=10), ckpt)
    assert keep == common.keep_dir(tmp_path, 'samples_ddim-S10-eta0', ddim.Config(steps=10), ckpt)
    assert keep != common.keep_dir(tmp_path, 'samples_ddim-S10-eta0', ddim.Config(steps=10, guidance=2.0), ckpt)
    os.utime(ckpt, ns=(10 ** 9, 10 ** 9))  # trained on, or replaced: another model
    assert keep != common.keep_dir(tmp_path, 'samples_ddim-S10-eta0', ddim.Config(steps=10), ckpt)
    for folder in (keep, tmp_path / '.samples_ddim-S20-eta0.abc'):
        folder.mkdir()
    common.write_samples(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), tmp_path, 'samples_ddim-S10-eta0', 'npz')
    assert not keep.exists() and (tmp_path / '.samples_ddim-S20-eta0.abc').exists()  # another tag's batches stay


def test_ddim_inversion_is_decoded_unclipped(tmp_path, monkeypatch):
    run(tmp_path, '--steps', '1')
    clips = []
    real = ddim.ddim_sample
    monkeypatch.setattr(ddim, 'ddim_sample', lambda model, x, ts, ab, eta, objective, clip, *a, **k:
                        clips.append(clip) or real(model, x, ts, ab, eta, objective, clip, *a, **k))
    ddim.main(['--out', str(tmp_path), '--device', 'cpu', '--mode', 'invert', '--steps', '4', '--n-samples', '1'])
    assert clips == [False]


def test_stats_without_a_mode_are_pytorch_fid_only(tmp_path):
    np.savez(tmp_path / 's.npz', mu=np.zeros(4), sigma=np.eye(4))  # pytorch-fid's own format: no mode key
    assert eval_fid.read_npz(tmp_path / 's.npz', 'pytorch-fid')[0].shape == (4,)
    with pytest.raises(ValueError, match='pytorch-fid\'s own format'):
        eval_fid.read_npz(tmp_path / 's.npz', 'clean')


def test_fid_cache_is_keyed_by_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv('GENMODELS_CACHE', str(tmp_path))
    calls = []
    monkeypatch.setattr(eval_fid, 'compute_features', lambda x, mode, model=None, batch_size=200:
                        calls.append(len(x)) or np.random.default_rng(len(calls)).normal(size=(len(x), 3)))
    model = torch.nn.Linear(1, 1)
    for wid in ('aaa', 'aaa', 'bbb'):
        model.weights_id = wid
        eval_fid.reference_stats('mnist:test', model=model)
    assert sorted(p.name for p in tmp_path.glob('fid-stats-*')) == ['fid-stats-mnist-test-pytorch-fid-aaa.npz',
                                                                     'fid-stats-mnist-test-pytorch-fid-bbb.npz']
    assert str(np.load(tmp_path / 'fid-stats-mnist-test-pytorch-fid-bbb.npz')['weights']) == 'bbb'
    assert calls == [50, 10000, 50, 10000]  # cost estimate + statistics, once per weights


def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path):
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 16-bit grey, up to 63,000
    Image.fromarray(a).save(tmp_path / 'deep.png')
    x = eval_fid.read_image(tmp_path / 'deep.png')
    assert x.shape == (8, 8, 3) and abs(x[..., 0].mean() - (a / 257).mean()) < 1  # scaled, not saturated at 255


def test_truncated_cache_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv('GENMODELS_CACHE', str(tmp_path))
    for name in ('x', 'y'):
        (tmp_path / f'mnist-test-{name}.npy').write_bytes(b'')
    with pytest.raises(common.DataError, match='mnist-test-x.npy .*delete both'):
        common.load_dataset('mnist', 'test')


@pytest.mark.parametrize('args, message', [
    (['--warmup', '0'], '--warmup 0 must be > 0'), (['--log-every', '0'], '--log-every 0 must be > 0'),
    (['--ckpt-every', '0'], '--ckpt-every 0 must be > 0'), (['--batch-size', '-4'], '--batch-size -4 must be > 0'),
    (['--batch-size', '0'], '--batch-size 0 must be > 0'),
    (['--dropout', '1.5'], r'--dropout 1.5 must be in \[0, 1\]'), (['--device', 'tpu'], 'unknown device'),
    (['--device', 'mps'], 'mps: not available'), (['--label', '10'], 'a class 0..9'),
])
def test_bad_ddpm_flags(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, '--steps', '1', *args)


def test_bad_paths_and_checkpoints(tmp_path, monkeypatch):
    (tmp_path / 'file').write_text('')
    with pytest.raises(SystemExit, match='is a file, not a folder'):
        run(tmp_path / 'file', '--steps', '1')
    monkeypatch.setenv('GENMODELS_CACHE', str(tmp_path / 'file'))
    with pytest.raises(SystemExit, match=r'GENMODELS_CACHE, default data/cache\) is a file'):
        common.cache_dir()
    monkeypatch.undo()
    run(tmp_path / 'run', '--steps', '1')
    ckpt = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    torch.save(dict(ckpt, ema=None), tmp_path / 'run' / 'ckpt.pt')
    with pytest.raises(SystemExit, match='no EMA weights'):
        ddpm.load_model(tmp_path / 'run' / 'ckpt.pt')
    torch.save(dict(ckpt, config=dict(ckpt['config'], ch=16)), tmp_path / 'run' / 'ckpt.pt')
    with pytest.raises(SystemExit, match='do not fit the U-Net'):
        ddpm.load_model(tmp_path / 'run' / 'ckpt.pt')


def test_bad_sampling_flags(tmp_path, monkeypatch):
    monkeypatch.setenv('FID_WEIGHTS', str(WEIGHTS))
    run(tmp_path, '--steps', '1')
    base = ['--out', str(tmp_path), '--device', 'cpu', '--steps', '4']
    for args, message in [(['--label', '15'], 'a class 0..9'), (['--n-samples', '0'], '--n-samples 0 must be > 0'),
                          (['--sample-batch', '0'], '--sample-batch 0 must be > 0'),
                          (['--eta', '100'], r'must be in \[0, 1\]'), (['--label', '3'], 'is unconditional'),
                          (['--guidance', '3'], 'is unconditional'),
                          (['--mode', 'inpaint', '--sampler', 'dpm++2m'], 'use --sampler ddim or ddpm')]:
        with pytest.raises(SystemExit, match=message):
            ddim.main(base + args)
    for args, message in [(['--grid-steps', '10,abc'], 'comma-separated integers'),
                          (['--grid-steps', '2', '--fid-samples', '2', '--fid-ref', 'nosuch:train'], 'FID reference nosuch:train')]:
        with pytest.raises(SystemExit, match=message):
            ddim_steps.main(['--out', str(tmp_path), '--device', 'cpu'] + args)
    with pytest.raises(SystemExit, match='is unconditional'):
        run(tmp_path, '--mode', 'sample', '--label', '3')


def test_malicious_init_from_is_refused_with_the_reason(tmp_path):
    (tmp_path / 'config.json').write_text('{"block_out_channels": [128, 256], "down_block_types": ["DownBlock2D", '
                                          '"DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"], '
                                          '"sample_size": 32, "in_channels": 3, "layers_per_block": 1}')

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    torch.save({'w': Evil()}, tmp_path / 'diffusion_pytorch_model.bin')
    with pytest.raises(SystemExit, match='not a plain weights file .*Unpickl'):
        ho_weights.main([str(tmp_path), '--out', str(tmp_path / 'run')])


def test_bad_eval_fid_flags(tmp_path):
    with pytest.raises(SystemExit, match='--batch-size 0 must be >= 1'):
        eval_fid.main(['a', 'b', '--batch-size', '0'])
    with pytest.raises(SystemExit, match='does not exist'):
        eval_fid.main(['mnist:test', '--save-stats', str(tmp_path / 'missing' / 's.npz')])


def test_resume_with_another_model_names_the_flag_to_pass(tmp_path):
    # every script's --resume check: the message names each changed key and the flag, as typed, that restores it
    cfg = ddpm.Config(num_res_blocks=3, resume=True)
    torch.save(dict(script='ddpm', config=dict(num_res_blocks=2, ch=cfg.ch)), tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match=r'different num_res_blocks; .* --num-res-blocks 2$'):
        common.resume(tmp_path, 'ddpm', cfg, ('num_res_blocks', 'ch'))
    torch.save(dict(script='ddpm', config=dict(num_res_blocks=3, ch=cfg.ch)), tmp_path / 'ckpt.pt')
    common.resume(tmp_path, 'ddpm', cfg, ('num_res_blocks', 'ch'))  # the same model: no error
