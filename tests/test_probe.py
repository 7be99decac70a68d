"""What the review and the bad-input / fault probe of vae.py, gan.py, flows.py and ldm.py found (issue 22), one test
per finding; each was run once with its bug put back and failed."""
import os, shutil, subprocess, sys

import numpy as np
import pytest
import torch

import common
import eval_fid
import flows
import gan
import ldm
import vae
from exercises import gan_inpaint, gan_study, vae_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ['--dataset', 'mnist', '--device', 'cpu', '--log-every', '1']
TINY = {'vae': CPU + ['--arch', 'conv', '--ch', '4', '--hidden', '16', '--latent', '3', '--batch-size', '8',
                      '--eval-n', '12', '--eval-k', '4'],
        'gan': CPU + ['--ch', '8', '--z-dim', '8', '--batch-size', '8', '--sample-every', '0', '--sample-batch', '16'],
        'flows': CPU + ['--ch', '8', '--blocks', '1', '--scales', '2', '--batch-size', '8', '--eval-images', '8',
                        '--sample-batch', '8']}
SCRIPTS = {'vae': vae, 'gan': gan, 'flows': flows}


def run(script, out, *args):
    return SCRIPTS[script].main(TINY[script] + ['--out', str(out)] + list(args))


def test_the_ema_generator_has_its_own_batch_norm_statistics(tmp_path):
    # 9: the EMA generator once copied the raw G's running statistics, which describe other weights
    run('gan', tmp_path, '--steps', '3', '--ema', '0.5')
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    G = gan.generator(8, 8, 1, 28)
    G.load_state_dict(ckpt['ema'])
    with torch.no_grad():  # the first batch norm's input on fresh noise: what its statistics should describe
        h = G[0](torch.randn(4096, 8, 1, 1, generator=torch.Generator().manual_seed(1)))
    var = h.var((0, 2, 3))
    torch.testing.assert_close(ckpt['ema']['1.running_var'], var, rtol=0.1, atol=0)
    assert ((ckpt['G']['1.running_var'] - var).abs() > var).all()  # G's statistics (a few momentum steps) are not


def test_the_inpainting_fill_is_bounded_like_every_generator_output():
    # 10: the inpainting generator had no tanh, so its fill could leave [-1, 1]
    x, m = torch.zeros(4, 1, 8, 8), gan_inpaint.random_masks(4, 8, 'cpu')
    out = gan_inpaint.inpaint(lambda inp, t: 100 * torch.randn(len(inp), 2, 8, 8), x, m)
    assert out.abs().max() <= 1 and out.abs().max() > 0.9


def test_ldm_finishes_a_half_trained_autoencoder_before_encoding(tmp_path, monkeypatch, capsys):
    # 13: an autoencoder stopped at step 4 of 3,000 was used silently
    real = common.load_dataset
    monkeypatch.setattr(common, 'load_dataset', lambda n, s='train', *a, **k: tuple(
        v[:64] if v is not None else None for v in real(n, s, *a, **k)))
    vae.main(CPU + ['--arch', 'ae', '--ch', '4', '--batch-size', '8', '--eval-n', '8', '--steps', '2',
                    '--out', str(tmp_path / 'ae')])
    ckpt = torch.load(tmp_path / 'ae' / 'ckpt.pt', weights_only=True)
    ckpt['steps'] = ckpt['config']['steps'] = 4  # as if it had been stopped at step 2 of 4
    torch.save(ckpt, tmp_path / 'ae' / 'ckpt.pt')
    with pytest.raises(SystemExit, match='stopped at step 2 of 4: finish it first'):
        vae.load_autoencoder(tmp_path / 'ae' / 'ckpt.pt')
    args = CPU + ['--ch', '8', '--attn-res', '4', '--T', '20', '--batch-size', '8', '--sample-steps', '2',
                  '--sample-every', '0', '--out', str(tmp_path / 'ldm'), '--vae', str(tmp_path / 'ae' / 'ckpt.pt')]
    ldm.main(args + ['--steps', '1'])
    assert torch.load(tmp_path / 'ae' / 'ckpt.pt', weights_only=True)['step'] == 4
    capsys.readouterr()
    ldm.main(args + ['--steps', '2', '--resume', '1', '--seed', '7', '--batch-size', '4'])  # 20: ldm.py said nothing
    assert 'warning: --resume with a different seed, batch_size' in capsys.readouterr().out


@pytest.mark.parametrize('script, opts', [('vae', ['opt']), ('gan', ['opt_g', 'opt_d']), ('flows', ['opt'])])
def test_a_new_lr_applies_on_resume(tmp_path, script, opts, capsys):
    # 14: vae.py and gan.py restored the old learning rate with the optimizer state; 20: flows.py did not warn
    run(script, tmp_path, '--steps', '2', '--lr', '1e-3')
    run(script, tmp_path, '--steps', '3', '--lr', '3e-4', '--seed', '7', '--resume', '1')
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['lr'] == 3e-4
    for opt in opts:  # flows.py sets its lr every step from the schedule: the last is lr_at(2, 3e-4, ...)
        want = flows.lr_at(2, 3e-4, ckpt['config']['warmup'], 3) if script == 'flows' else 3e-4
        assert ckpt[opt]['param_groups'][0]['lr'] == pytest.approx(want)
    assert 'warning: --resume with a different seed, lr' in capsys.readouterr().out


def test_a_collapsed_gan_stops_with_its_last_good_checkpoint(tmp_path):
    # 15: --lr 1e3 ended "done", exit 0, with weights of 1.9e19, zero gradients and a white grid
    with pytest.raises(SystemExit, match='the GAN collapsed'):
        run('gan', tmp_path, '--steps', '40', '--lr', '1e3', '--ckpt-every', '1000', '--log-every', '5')
    assert not (tmp_path / 'ckpt.pt').exists()  # nothing good to keep: no checkpoint of the dead model
    assert gan.collapsed({'|grad D|': 1.0, '|grad G|': 0.0, '|w G|': 1.0, '|w D|': 1.0})
    assert gan.collapsed({'|grad D|': 1.0, '|grad G|': 1.0, '|w G|': 2e6, '|w D|': 1.0})
    assert not gan.collapsed({'|grad D|': 1.0, '|grad G|': 1.0, '|w G|': 10.0, '|w D|': 10.0})


def test_writing_one_format_removes_the_other(tmp_path, capsys):
    # 16: --save png left a stale samples.npz behind and claimed to have written it
    x = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    common.write_samples(x, tmp_path, 'samples', 'png,npz')
    common.write_samples(x[:2], tmp_path, 'samples', 'png')
    assert not (tmp_path / 'samples.npz').exists() and len(list((tmp_path / 'samples').glob('*.png'))) == 2
    assert '.npz' not in capsys.readouterr().out.splitlines()[-1]
    common.write_samples(x[:1], tmp_path, 'samples', 'npz')
    assert not list((tmp_path / 'samples').glob('*.png')) and np.load(tmp_path / 'samples.npz')['arr_0'].shape[0] == 1


def test_a_gan_study_continues_each_run_on_its_own(tmp_path):
    # 17: the study passed one --resume to every sub-run, so an interrupted study could not be continued
    args = TINY['gan'] + ['--out', str(tmp_path), '--study', 'beta1', '--steps', '1', '--fid-samples', '4']
    scored = []
    with pytest.MonkeyPatch.context() as mp:
        import eval_fid
        mp.setattr(eval_fid, 'run_scorer', lambda *a: lambda x: scored.append(len(x)) or 1.0)
        gan_study.main(args)
        (tmp_path / 'beta1-0.9' / 'ckpt.pt').unlink()  # the second run was killed before its first checkpoint
        gan_study.main(args)  # the first is finished (read), the second starts afresh
    assert torch.load(tmp_path / 'beta1-0.9' / 'ckpt.pt', weights_only=True)['step'] == 1


def test_a_data_dir_given_is_checked_even_with_a_cache(tmp_path, monkeypatch):
    # 18: once the decoded cache existed, a missing or corrupt --data-dir was never read
    common.load_dataset('mnist', 'test')  # the cache exists now
    monkeypatch.setattr(common, 'download', lambda *a: (_ for _ in ()).throw(OSError('offline')))
    with pytest.raises(common.DataError, match='could not get .* Put the official file at'):
        common.load_dataset('mnist', 'test', tmp_path / 'empty')
    bad = tmp_path / 'bad' / 'mnist'
    bad.mkdir(parents=True)
    for f in common.DATASETS['mnist']['files']:
        (bad / f).write_bytes(b'not the archive')
    with pytest.raises(common.DataError, match='sha256 is .* expected'):
        common.load_dataset('mnist', 'test', tmp_path / 'bad')


def _claim_in_another_process(folder):
    holder = subprocess.Popen([sys.executable, '-c', f'import common, time; common.claim({str(folder)!r}); '
                               f'print("ok", flush=True); time.sleep(60)'], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'ok'
    return holder


@pytest.mark.parametrize('script', ['vae', 'gan', 'flows'])
def test_sampling_into_a_run_that_is_training_is_refused(tmp_path, script):
    # 19: --mode sample of vae/gan/flows wrote into a live run
    run(script, tmp_path / 'a', '--steps', '1')  # (this process keeps its claim on a: the run goes on in b)
    (tmp_path / 'b').mkdir()
    shutil.copy(tmp_path / 'a' / 'ckpt.pt', tmp_path / 'b' / 'ckpt.pt')
    holder = _claim_in_another_process(tmp_path / 'b')
    try:
        with pytest.raises(SystemExit, match='in use by another run'):
            SCRIPTS[script].main(['--device', 'cpu', '--mode', 'sample', '--out', str(tmp_path / 'b'),
                                  '--n-samples', '2'])
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize('args, message', [
    (['--ch-mult', '0'], 'multipliers >= 1'),  # 21: a ZeroDivisionError traceback
    (['--attn-res', '3'], r"--attn-res 3: the U-Net's latent resolutions are 8, 4"),  # 21: silently no attention
    (['--vae', 'x/ae.pt'], "give <run folder>/ckpt.pt"),  # 24: trained into x/ckpt.pt, then failed
])
def test_ldm_bad_flags_fail_at_start(tmp_path, args, message):
    args = [str(tmp_path / a) if a.endswith('.pt') else a for a in args]
    with pytest.raises(SystemExit, match=message):  # (never the default autoencoder path, with a bug back in place)
        ldm.main(CPU + ['--out', str(tmp_path / 'run'), '--steps', '1', '--vae', str(tmp_path / 'ae' / 'ckpt.pt')]
                 + args)
    assert not (tmp_path / 'x').exists()


def test_a_sweep_checks_every_value_before_training(tmp_path):
    # 22: --values 2,abc trained the first model, then died with a ValueError traceback
    with pytest.raises(SystemExit):
        vae_sweep.main(TINY['vae'] + ['--out', str(tmp_path), '--sweep', 'latent', '--values', '2,abc', '--steps', '1'])
    assert not list(tmp_path.iterdir())


def test_inpainting_refuses_more_fid_samples_than_test_images(tmp_path):
    # 23: --fid-samples 1500 on a 1,017-image test split died with a tensor-size traceback at the first FID
    with pytest.raises(SystemExit, match='--fid-samples 20000: the test split of mnist has 10000 images'):
        gan_inpaint.main(TINY['gan'] + ['--out', str(tmp_path), '--fid-samples', '20000', '--steps', '1'])
    assert not list(tmp_path.iterdir())


def test_garbage_files_never_suggest_the_unsafe_path(tmp_path):
    # 25: torch advised "weights_only=False will likely succeed"; numpy advised allow_pickle
    (tmp_path / 'ckpt.pt').write_bytes(os.urandom(4096))
    (tmp_path / 'x.npz').write_bytes(os.urandom(4096))
    messages = []
    for call in (lambda: common.load_ckpt(tmp_path / 'ckpt.pt', 'gan'),
                 lambda: vae.main(['--device', 'cpu', '--mode', 'eval', '--out', str(tmp_path)]),
                 lambda: common.load_dataset(str(tmp_path / 'x.npz')),
                 lambda: eval_fid.read_npz(tmp_path / 'x.npz')):
        with pytest.raises((SystemExit, ValueError)) as e:
            call()
        messages.append(str(e.value))
    assert all('is not a checkpoint' in m for m in messages[:2]) and 'not an .npz' in messages[2]
    assert 'cannot read' in messages[3], messages
    assert not any('weights_only' in m or 'allow_pickle' in m for m in messages), messages
