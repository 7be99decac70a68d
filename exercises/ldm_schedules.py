"""Exercise: linear and cosine schedules at T = 10 in latent space: beta_t, alpha_bar_t and SNR (schedules.csv/.png),
and one test latent of an ldm.py run noised to t = 1..10 by each and decoded (schedules_T10.png).
    python exercises/ldm_schedules.py --out runs/ldm-mnist
"""
import os, sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, ddpm, ldm
from exercises import schedules


@dataclass
class Config:
    out: str = 'runs/ldm-mnist'  # an ldm.py run folder (the figures are written there)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # seeds every run
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data)


@torch.no_grad()
def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    with common.script_guard():
        lcfg = ldm.Config(mode='sample', out=cfg.out, device=cfg.device, sample_steps=1, seed=cfg.seed,
                          data_dir=cfg.data_dir)
        model, ae, scale, zshape, lcfg = ldm.load(lcfg)
        schedules.figures(10, cfg.out)
        device = next(model.parameters()).device
        x = ldm.test_images(lcfg, 1, device)[0]
    z0 = ae.encode(x) * scale
    eps = torch.randn(z0.shape, device=device, generator=torch.Generator(device).manual_seed(cfg.seed))
    rows = [torch.cat([x] + [ldm.decode(ae, ddpm.q_sample(z0, ab.float(), eps), scale)
                             for ab in ddpm.make_alpha_bar(name, 10)]) for name in ('linear', 'cosine')]
    common.save_grid(common.to_uint8(torch.cat(rows)), Path(cfg.out) / 'schedules_T10.png', 11)
    print(f'wrote {cfg.out}/schedules_T10.png (row 1 linear, row 2 cosine: the input, then z_t decoded, t = 1..10)')


if __name__ == '__main__':
    main()
