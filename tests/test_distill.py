"""distill.py: progressive and consistency distillation against closed forms. With Gaussian data N(m, s^2) the exact
denoiser is known, so the progressive target must make one student step land where two teacher DDIM steps land; the
consistency parameterisation must meet its boundary and start as the teacher's denoiser; then train/sample/resume."""
import numpy as np
import pytest
import torch

import ddpm
import distill
import sde
from helpers import ctrl_c_on_call

M, S = 0.1, 0.3  # the Gaussian data: mean and standard deviation of every pixel
VP = sde.VPSDE('cosine', 1000)


class GaussianV(torch.nn.Module):
    """The exact v-prediction for x_0 ~ N(M, S^2) at the label's continuous time t = label / (T - 1):
    E[x_0 | x_t] = M + sqrt(ab) S^2 (x_t - sqrt(ab) M) / (ab S^2 + 1 - ab), v = (sqrt(ab) x_t - x_0) / sqrt(1 - ab)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        ab = torch.tensor([VP.alpha_bar(v / (VP.T - 1)) for v in t.tolist()], dtype=torch.float64)
        ab, x = ab.view(-1, *[1] * (x.dim() - 1)), x.double()
        x0 = M + ab.sqrt() * S ** 2 * (x - ab.sqrt() * M) / (ab * S ** 2 + 1 - ab)
        return ((ab.sqrt() * x - x0) / (1 - ab).sqrt()).float() + self.w


class PDStudent(torch.nn.Module):
    """A student of N steps that predicts the closed-form target x~ (as v) from the teacher's 2N-step grid."""

    def __init__(self, teacher, N):
        super().__init__()
        self.teacher, self.N = teacher, N
        self.ab = distill.alpha_bars(VP, [k / (2 * N) for k in range(2 * N + 1)])

    def forward(self, x, t, y=None):
        k = (t / (VP.T - 1) * 2 * self.N).round().long()
        at = lambda z, j: distill.x0_at(self.teacher, 'v', VP, z, j / (2 * self.N), self.ab[j].view(-1, 1, 1, 1))
        x0 = distill.pd_target(at, x.double(), k, self.ab)
        ab = self.ab[k].view(-1, 1, 1, 1)
        return ((ab.sqrt() * x - x0) / (1 - ab).sqrt()).float()


def noise(n=256, seed=0):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('N', [1, 2, 4])
def test_one_student_step_on_the_target_lands_where_two_teacher_steps_land(N):
    teacher, z = GaussianV(), noise()
    two = distill.sample_grid(teacher, z, VP, 'v', 2 * N)
    one = distill.sample_grid(PDStudent(teacher, N), z, VP, 'v', N)
    assert (one - two).abs().max() < 1e-4
    assert (distill.sample_grid(teacher, z, VP, 'v', N) - two).abs().max() > 1e-3  # the check can see a step


def test_the_pd_loss_is_zero_for_the_target_and_not_for_the_teacher():
    teacher, x0 = GaussianV(), M + S * noise(64, 1)
    torch.manual_seed(0)
    assert distill.pd_loss(PDStudent(teacher, 2), teacher, x0, 2, VP, 'v', False) < 1e-9
    torch.manual_seed(0)
    assert distill.pd_loss(teacher, teacher, x0, 2, VP, 'v', False) > 1e-4


def test_the_truncated_snr_weight_is_max_snr_1(monkeypatch):
    """A student off its target by c everywhere costs c^2 max(SNR(t), 1), averaged over its draws of t = k / 2N."""
    seen, c = [], 0.01
    monkeypatch.setattr(distill, 'pd_target', lambda teacher_x0, z, k, ab: seen.append(k) or torch.zeros_like(z))
    monkeypatch.setattr(distill, 'x0_at', lambda net, *a, **kw: torch.full((64, 1, 2, 2), c))
    loss = distill.pd_loss(None, None, M + S * noise(64, 2), 4, VP, 'v', False).item()
    w = [max(VP.alpha_bar(t) / (1 - VP.alpha_bar(t)), 1) for t in (seen[0] / 8).tolist()]
    assert min(w) == 1 and max(w) > 5  # both sides of the truncation were drawn
    assert abs(loss - c * c * sum(w) / len(w)) < 1e-5 * loss


def test_c_skip_and_c_out_meet_the_boundary_at_sigma_min():
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out = distill.c_skip_out(sigma, 0.002)
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[2] < 1e-3 and 0.99 < c_out[2] <= 1
    net = ddpm.UNet(1, 8, (1, 2), 1, (), 0.0, 8)  # a random network: f(x, sigma_min) = x whatever it outputs
    xh = torch.randn(3, 1, 8, 8)
    f = distill.consistency(net, 'v', VP, xh, torch.full((3,), 0.002), torch.zeros(3), 0.002)
    assert torch.equal(f, xh)


def test_with_sigma_min_0_the_teachers_copy_is_its_denoiser():
    """sigma_data = 1: c_skip x^ + c_out (-v) = x^ / (1 + sigma^2) - sigma v / sqrt(1 + sigma^2) = E[x_0 | x]."""
    teacher, x0 = GaussianV(), M + S * noise(4, 3)
    sigma, t = distill.levels(VP, [0.3, 2.0, 7.0, 40.0])
    xh = x0 + sigma.view(-1, 1, 1, 1) * noise(4, 4)
    f = distill.consistency(teacher, 'v', VP, xh, sigma, t, 0.0)
    assert torch.allclose(f, distill.denoised(teacher, 'v', VP, xh, sigma, t), atol=1e-5)
    ab = 1 / (1 + sigma.view(-1, 1, 1, 1) ** 2)  # and that is the Gaussian posterior mean
    exact = M + ab * S ** 2 * (xh - M) / (ab * S ** 2 + 1 - ab)
    assert torch.allclose(f, exact, atol=1e-4)


def test_levels_invert_the_schedule():
    for s in (0.01, 1.0, 50.0):  # alpha_bar(t) = 1 / (1 + sigma^2)
        assert abs(VP.alpha_bar(distill.time_of(VP, s)) * (1 + s * s) - 1) < 1e-12
    assert distill.time_of(VP, 1e-4) == 0 and distill.time_of(VP, 1e6) > 1 - 1e-12  # outside the schedule


def test_the_target_network_sets_the_goal_and_gets_no_gradient():
    teacher = ddpm.UNet(1, 8, (1, 2), 1, (), 0.0, 8).requires_grad_(False)
    online, target, other = (distill.copy.deepcopy(teacher) for _ in range(3))
    online.requires_grad_(True)
    torch.nn.init.normal_(other.conv_out.weight)  # a target that differs from the online network

    def loss(target):
        torch.manual_seed(0)
        return distill.cd_loss(online, target, teacher, torch.randn(4, 1, 8, 8), distill.levels(VP, [0.002, 0.5, 5.0]),
                               VP, 'v', distill.Config(distance='huber'))
    assert abs(loss(other).item() - loss(target).item()) > 1e-4  # the goal is the target's, not the online network's
    loss(target).backward()
    assert all(p.grad is None for p in [*target.parameters(), *teacher.parameters()])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in online.parameters())


TINY = ['--device', 'cpu', '--batch-size', '4', '--log-every', '1', '--sample-batch', '4']


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp('teacher')
    ddpm.main(['--dataset', 'mnist', '--device', 'cpu', '--ch', '8', '--ch-mult', '1,2', '--num-res-blocks', '1',
               '--attn-res', '', '--T', '20', '--batch-size', '4', '--steps', '1', '--objective', 'v', '--out',
               str(out)])
    return out


def run(*args):
    return distill.main(TINY + [str(a) for a in args])


def test_two_stages_then_sampling(teacher, tmp_path, capsys):
    run('--teacher', teacher, '--start-steps', 4, '--steps', 2, '--out', tmp_path)
    assert sorted(p.name for p in tmp_path.glob('stage_*.pt')) == ['stage_0.pt', 'stage_1.pt', 'stage_2.pt']
    s1, s2 = (torch.load(tmp_path / f'stage_{k}.pt', weights_only=True) for k in (1, 2))
    assert (s1['steps'], s2['steps']) == (2, 1)
    assert any(not torch.equal(s1['model'][k], s2['model'][k]) for k in s1['model'])
    run('--mode', 'sample', '--out', tmp_path, '--n-samples', 5)
    x = np.load(tmp_path / 'samples_stage2-N1.npz')['arr_0']
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8
    assert '1 network evaluations per image' in capsys.readouterr().out
    run('--mode', 'sample', '--out', tmp_path, '--stage', 0, '--sample-steps', 3, '--eta', 1, '--save', 'npz')
    assert np.load(tmp_path / 'samples_stage0-N3-eta1.npz')['arr_0'].shape == (64, 28, 28, 1)
    run('--teacher', tmp_path / 'stage_1.pt', '--start-steps', 2, '--steps', 1, '--out', tmp_path / 'further')
    s0 = torch.load(tmp_path / 'further' / 'stage_0.pt', weights_only=True)  # a stage distilled further
    assert s0['steps'] == 2 and all(torch.equal(s0['model'][k], s1['model'][k]) for k in s1['model'])


def test_consistency_trains_its_target_by_ema_and_samples(teacher, tmp_path):
    run('--teacher', teacher, '--method', 'consistency', '--steps', 1, '--mu', 0.75, '--out', tmp_path)
    ck, t = torch.load(tmp_path / 'ckpt.pt', weights_only=True), torch.load(teacher / 'ckpt.pt', weights_only=True)
    moved = [k for k in ck['model'] if ck['model'][k].is_floating_point() and not torch.equal(ck['model'][k],
                                                                                           t['ema'][k])]
    assert moved
    for k in moved:  # theta- = mu theta-_0 + (1 - mu) theta_1, theta-_0 = the teacher
        assert torch.allclose(ck['frozen'][k], 0.75 * t['ema'][k] + 0.25 * ck['model'][k], atol=1e-6), k
    for n in (1, 2):
        run('--mode', 'sample', '--out', tmp_path, '--sample-steps', n, '--n-samples', 3, '--sigma-mid', 0.2)
    assert np.load(tmp_path / 'samples_cd-N2-mid0.2.npz')['arr_0'].shape == (3, 28, 28, 1)


def test_resume_is_bit_identical(teacher, tmp_path, monkeypatch):
    args = ['--teacher', teacher, '--start-steps', 4, '--steps', 2]
    run(*args, '--out', tmp_path / 'a')
    with monkeypatch.context() as m:
        m.setattr(distill, 'pd_loss', ctrl_c_on_call(distill.pd_loss, 3))  # in step 3
        with pytest.raises(SystemExit, match='130'):
            run(*args, '--out', tmp_path / 'b')
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['step'] == 3
    run(*args, '--out', tmp_path / 'b', '--resume', 1)
    for name in ('ckpt.pt', 'stage_2.pt'):
        a, b = (torch.load(tmp_path / p / name, weights_only=True)['model'] for p in 'ab')
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_bad_input_is_one_clear_error(teacher, tmp_path):
    eps = tmp_path / 'eps'
    ddpm.main(['--dataset', 'mnist', '--device', 'cpu', '--ch', '8', '--ch-mult', '1,2', '--num-res-blocks', '1',
               '--attn-res', '', '--T', '20', '--batch-size', '4', '--steps', '1', '--out', str(eps)])
    for args, message in [(['--teacher', eps], 'predicts eps'), (['--teacher', tmp_path / 'none'], 'no checkpoint'),
                          ([], 'give --teacher'), (['--teacher', teacher, '--start-steps', 1000], 'powers of 2'),
                          (['--teacher', teacher, '--method', 'pd'], "--method 'pd' is not one of"),
                          (['--mode', 'sample'], 'holds no distill.py run')]:
        with pytest.raises(SystemExit, match=message):
            run(*args, '--out', tmp_path / 'run')
    torch.save(dict(script='vae', model={}), tmp_path / 'vae.pt')
    with pytest.raises(SystemExit, match='not written by ddpm'):
        run('--teacher', tmp_path / 'vae.pt', '--out', tmp_path / 'run')
    run('--teacher', teacher, '--start-steps', 2, '--steps', 1, '--out', tmp_path / 'pd')
    with pytest.raises(SystemExit, match='distilled for 1 deterministic steps'):
        run('--mode', 'sample', '--out', tmp_path / 'pd', '--sample-steps', 2)
    with pytest.raises(SystemExit, match='is a 1-step student: distil it on with --start-steps 1'):
        run('--teacher', tmp_path / 'pd' / 'stage_1.pt', '--out', tmp_path / 'run')
