"""Exercise: inpainting, masked MSE alone against MSE + --adv-weight x gan.py's adversarial loss, all else equal. The
generator, a small ddpm.py U-Net g(x (1 - m), m), never sees the masked pixels: x' = (1 - m) x + m tanh(g(.)), m a
random quarter-size square; a gan.py discriminator judges real against in-filled images. Then the first
--fid-samples test images are in-filled: masked MSE and FID of each, and inpaint_test.png.
    python exercises/gan_inpaint.py --dataset mnist --device cpu --ch 16 --steps 4000    # README "gan.py"
"""
import argparse, copy, dataclasses, os, sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, ddpm, gan
from exercises.curves import plot_logs, read_log

RUNS = {'mse': 0.0, 'mse+adv': None}  # label -> adversarial weight (None: --adv-weight)


def random_masks(n, size, device, generator=None):
    """m = 1 on a (size/2)^2 square at a random place in each image (the pixels to fill in): (n, 1, size, size)."""
    k, r = size // 2, torch.arange(size, device=device)
    top, left = torch.randint(0, size - k + 1, (2, n, 1, 1), device=device, generator=generator)
    return ((r[:, None] >= top) & (r[:, None] < top + k) & (r >= left) & (r < left + k)).float()[:, None]


def inpaint(g, x, m):
    """x' = (1 - m) x + m tanh(g(x (1 - m), m)): g never sees a masked pixel, the known ones pass through unchanged,
    and the fill is bounded to [-1, 1] like every generator's output."""
    t = torch.zeros(len(x), device=x.device)  # ddpm's U-Net takes a timestep; a constant one carries nothing
    return (1 - m) * x + m * torch.tanh(g(torch.cat([x * (1 - m), m], 1), t)[:, :x.shape[1]])  # C + 1 out: drop 1


def unet(ch, C, H):  # halving 2 (28x28) or 3 (32x32) times; no attention, no dropout
    return ddpm.UNet(C + 1, ch, (1, 2, 2) if H == 28 else (1, 2, 2, 2), 1, (), 0.0, H)


@torch.no_grad()
def fill(G, x, seed, batch=500):
    """uint8 test images x in-filled in masks drawn from seed (batch i: seed (seed, i)), uint8."""
    return common.sample_many(lambda i, n, g: common.to_uint8(inpaint(G.eval(), x[i:i + n].float() / 127.5 - 1,
                                                                       random_masks(n, x.shape[-1], x.device, g))),
                              len(x), batch, seed, x.device)


def train(cfg, adv_weight, x_test):
    device, rank, world = common.setup(cfg.device)
    out = Path(cfg.out)
    x = common.load_dataset(cfg.dataset, 'train', cfg.data_dir or None)[0].to(device)
    C, H, B = x.shape[1], x.shape[2], cfg.batch_size // world
    torch.manual_seed(cfg.seed)
    G, D = unet(cfg.ch, C, H).to(device), gan.discriminator(cfg.ch, C, H).to(device)
    ema = copy.deepcopy(G).requires_grad_(False) if cfg.ema else G
    opt_g, opt_d = (torch.optim.Adam(n.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2)) for n in (G, D))
    if rank == 0:
        common.claim(out)
    if ckpt := common.resume(out, 'gan-inpaint', cfg, gan.MODEL_KEYS, gan.RECIPE_KEYS):
        G.load_state_dict(ckpt['G']), D.load_state_dict(ckpt['D']), ema.load_state_dict(ckpt['ema'])
        common.load_opt(opt_g, ckpt['opt_g']), common.load_opt(opt_d, ckpt['opt_d'])
    if cfg.fid_every and rank == 0:
        import eval_fid
        scorer = eval_fid.run_scorer(cfg.fid_ref, cfg.dataset, x, device)

    def save(step, clock):
        common.save_ckpt(out / 'ckpt.pt', dict(script='gan-inpaint', G=G.state_dict(), D=D.state_dict(), step=step,
                                               ema=ema.state_dict(), opt_g=opt_g.state_dict(),
                                               opt_d=opt_d.state_dict(), config=dict(dataclasses.asdict(cfg),
                                                                                     adv_weight=adv_weight)))

    with common.Loop(cfg, out, save, ckpt['step'] if ckpt else 0, sample=cfg.sample_every, fid=cfg.fid_every) as loop:
        for step in loop:
            xb = common.random_batch(x, None, B, cfg.flip)[0]
            with torch.no_grad():
                fake = inpaint(G, xb, random_masks(B, H, device))
            loss_d, d_real, d_fake = gan.d_loss_fn(D, xb, fake)  # D: real against in-filled images
            gnorm_d = gan.backward_step(loss_d, D, opt_d, world)
            xb, m = common.random_batch(x, None, B, cfg.flip)[0], random_masks(B, H, device)
            fake = inpaint(G, xb, m)
            D.requires_grad_(False)
            adv = gan.g_loss_fn(D(fake))
            D.requires_grad_(True)
            mse = ((fake - xb) ** 2 * m).sum() / (m.sum() * C)  # over the masked pixels only
            loss_g = mse + adv_weight * adv  # --adv-weight 0: D still trains, as a monitor
            gnorm_g = gan.backward_step(loss_g, G, opt_g, world)
            if cfg.ema:
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()), list(G.parameters()),
                                         1 - min(cfg.ema, (1 + step) / (10 + step)))
            loop.log(**{'loss D': loss_d, 'loss G': loss_g, 'mse': mse, 'D(x)': d_real, 'D(G(z))': d_fake,
                        '|grad D|': gnorm_d, '|grad G|': gnorm_g})
            if loop.due('sample') and rank == 0:
                common.save_grid(rows([ema], x_test[:16], cfg.seed), out / f'samples_{loop.done:07d}.png', 16)
            if cfg.fid_every and loop.due('fid') and rank == 0:
                loop.write(f'fid{cfg.fid_samples} {scorer(fill(ema, x_test[:cfg.fid_samples], cfg.seed)):.4f}')
            G.train()
    return ema


def rows(Gs, x, seed):
    """Rows of test images (uint8): masked input, each generator's in-filling, the original (the same masks)."""
    m = random_masks(len(x), x.shape[-1], x.device, torch.Generator(x.device).manual_seed(seed * 1_000_003))
    return torch.cat([common.to_uint8((x / 127.5 - 1) * (1 - m)), *[fill(G, x, seed) for G in Gs], x.cpu()])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='every other flag is a gan.py flag (python gan.py --help)')
    p.add_argument('--adv-weight', type=float, default=0.01, help='weight of the adversarial term (default 0.01)')
    args, rest = p.parse_known_args(argv)
    cfg = common.parse_config(gan.Config, gan.PRESETS, gan.pick, rest)
    out = Path(cfg.out or f'runs/gan-{cfg.dataset}-inpaint')
    gan.check(cfg)
    if cfg.loss != 'bce' or cfg.n_critic != 1 or cfg.ch % 4 or cfg.dataset not in common.DATASETS:
        common.fail('inpainting needs --loss bce, --n-critic 1, --ch a multiple of 4 and a dataset with a test split '
                    '(mnist, fashion-mnist, cifar10, cifar10-subset)')
    with common.script_guard():
        x_test = common.load_dataset(cfg.dataset, 'test', cfg.data_dir or None)[0]
        if cfg.fid_samples > len(x_test):
            common.fail(f'--fid-samples {cfg.fid_samples}: the test split of {cfg.dataset} has {len(x_test)} images')
        x_test = x_test[:cfg.fid_samples].to(common.resolve_device(cfg.device))
        Gs = {}
        for label, w in RUNS.items():  # each run continues (or just reads) what is there
            sub = dataclasses.replace(cfg, out=str(out / label), fid_every=cfg.fid_every or 10 ** 9)
            Gs[label] = train(dataclasses.replace(sub, resume=(Path(sub.out) / 'ckpt.pt').exists()),
                              args.adv_weight if w is None else w, x_test)
    plot_logs({label: out / label for label in RUNS}, out / 'inpaint.png', title='inpaint: ')
    lines = []
    for label, G in Gs.items():  # the error is 0 on the known pixels, and a quarter of them is masked
        err = (fill(G, x_test, cfg.seed).float() - x_test.cpu().float()) / 127.5
        fid = read_log(out / label / 'log.txt')['FID'][1][-1]
        mse = err.pow(2).sum() / (err.numel() / 4)
        lines.append(f'{label:10s} | FID-{len(x_test)} {fid:.2f} | masked MSE {mse:.4f}'
                     f' ([-1, 1], {len(x_test)} test images)')
    common.save_grid(rows(list(Gs.values()), x_test[:16], cfg.seed), out / 'inpaint_test.png', 16)
    (out / 'inpaint.txt').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines) + f'\nwrote {out}/inpaint.txt, inpaint.png (curves), inpaint_test.png, a folder per run')


if __name__ == '__main__':
    main()
