"""Exercise 13: a small U-Net (ddpm.py's, 4 resolution levels of 2 residual blocks each, sinusoidal timestep
embedding) trained to denoise MNIST at one noise level: y = x + sigma z, x in [-1, 1] (ddpm.py's scale), sigma 0.5.
It predicts z (x_hat = y - sigma z_hat, the MSE of x_hat up to sigma^2). The test PSNR of the noisy, denoised and
Gaussian-blurred images (the blur's width chosen on training images), and a noisy / blur / U-Net / clean figure.

    python exercises/denoise.py --device cpu --steps 1000       # README "Exercises" -> runs/denoise/
MNIST's 28x28 images are padded to 32x32 with background (-1) so that the U-Net can halve them three times; PSNR is
measured on the 28x28 images on [0, 1] (10 log10(1 / MSE), per image, then averaged). The timestep input is the
noise level (t = 1000 sigma): with one sigma it is a constant, which the network learns to use as a bias.
"""
import dataclasses, math, os, sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, ddpm

BLURS = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)  # Gaussian widths (pixels) tried for the baseline


@dataclass
class Config:
    dataset: str = 'mnist'  # mnist | fashion-mnist
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data)
    sigma: float = 0.5  # noise standard deviation on the [-1, 1] scale (0.25 on [0, 1])
    out: str = 'runs/denoise'  # run folder (ckpt.pt, log.txt, the figure)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # seeds the weights, the batches and the noise
    ch: int = 32  # U-Net base channels; levels ch x (1, 2, 2, 2), 2 residual blocks each
    steps: int = 5000  # optimizer steps
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # Adam, constant
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 100  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints
    eval_images: int = 10000  # test images for the PSNRs (the first n)


def psnr(x, ref):
    """Mean per-image PSNR in dB of images in [-1, 1], measured on [0, 1] after clipping: 10 log10(1 / MSE)."""
    mse = (((x.clamp(-1, 1) - ref) / 2) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp(min=1e-10))).mean().item()


def blur(x, width):
    """Separable Gaussian blur (std width pixels, 4 std wide), background-padded at the borders."""
    r = math.ceil(4 * width)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * width ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), value=-1), k)
    return F.conv2d(F.pad(x, (0, 0, r, r), value=-1), k.transpose(2, 3))


def denoise(net, y, sigma):
    """x_hat = y - sigma z_hat(y) on 28x28 images y, through the U-Net on 32x32."""
    t = torch.full((len(y),), 1000 * sigma, device=y.device)
    return y - sigma * net(F.pad(y, (2, 2, 2, 2), value=-1), t)[..., 2:-2, 2:-2]


@torch.no_grad()
def evaluate(net, y, sigma, batch=500):
    return torch.cat([denoise(net, y[i:i + batch], sigma) for i in range(0, len(y), batch)])


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, dict(dataset=('mnist', 'fashion-mnist')), positive=('sigma', 'ch', 'steps', 'batch_size', 'lr',
                                                                          'log_every', 'ckpt_every', 'eval_images'))
    with common.script_guard():
        device, _, _ = common.setup(cfg.device)
        x = common.load_dataset(cfg.dataset, 'train', cfg.data_dir or None)[0].to(device)
        x_test = common.load_dataset(cfg.dataset, 'test', cfg.data_dir or None)[0][:cfg.eval_images].to(device)
        out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        net = ddpm.UNet(1, cfg.ch, (1, 2, 2, 2), 2, (), 0.0, 32).to(device)
        opt = torch.optim.Adam(net.parameters(), cfg.lr)
        common.claim(out)
        if ckpt := common.resume(out, 'denoise', cfg, ('dataset', 'sigma', 'ch')):
            net.load_state_dict(ckpt['model']), common.load_opt(opt, ckpt['opt'])
        print(f'U-Net {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, sigma {cfg.sigma}')

        def save(step, clock):
            common.save_ckpt(out / 'ckpt.pt', dict(script='denoise', model=net.state_dict(), opt=opt.state_dict(),
                                                   step=step, config=dataclasses.asdict(cfg)))

        with common.Loop(cfg, out, save, ckpt['step'] if ckpt else 0) as loop:
            for step in loop:
                xb = common.random_batch(x, None, cfg.batch_size, False)[0]
                z = torch.randn_like(xb)
                loss = F.mse_loss(denoise(net, xb + cfg.sigma * z, cfg.sigma), xb) / cfg.sigma ** 2  # = |z_hat - z|^2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loop.log(loss=loss)
        g = torch.Generator(device).manual_seed(cfg.seed + 1)  # the same noisy test images every run
        clean = x_test.float() / 127.5 - 1
        noisy = clean + cfg.sigma * torch.randn(clean.shape, generator=g, device=device)
        x_val = x[:1000].float() / 127.5 - 1  # the blur's width, chosen on training images
        y_val = x_val + cfg.sigma * torch.randn(x_val.shape, generator=g, device=device)
        width = max(BLURS, key=lambda w: psnr(blur(y_val, w), x_val))
        net.eval()
        results = {'noisy': noisy, f'Gaussian blur (std {width} px)': blur(noisy, width),
                   'U-Net': evaluate(net, noisy, cfg.sigma)}
        lines = [f'{name:28s} PSNR {psnr(im, clean):6.2f} dB' for name, im in results.items()]
        text = '\n'.join(lines) + f'\n({len(clean)} {cfg.dataset} test images, sigma {cfg.sigma} on [-1, 1], ' \
                                  f'step {loop.done})\n'
        (out / 'denoise.txt').write_text(text)
        common.save_grid(torch.cat([common.to_uint8(im[:10]) for im in list(results.values()) + [clean]]),
                         out / 'denoise.png', 10)
        print(text + f'wrote {out}/denoise.txt, denoise.png (rows: noisy, blur, U-Net, clean)')
        return {name: psnr(im, clean) for name, im in results.items()}


if __name__ == '__main__':
    main()
