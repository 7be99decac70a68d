"""Exercise: Ho et al.'s own CIFAR-10 model. Their released weights (google/ddpm-cifar10-32: diffusers' UNet2DModel
layout) are mapped onto ddpm.UNet and written as a ddpm.py checkpoint that ddim.py and ddpm.py sample like any run.
    python exercises/ho_weights.py google-ddpm-cifar10-32/ --out runs/ho && python ddim.py --out runs/ho --steps 50
tests/test_ddim.py checks the mapping against diffusers' own UNet2DModel on random weights.
"""
import dataclasses, json, os, sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, ddpm


@dataclass
class Config:
    folder: str = ''  # a diffusers UNet2DModel folder (config.json + weights)
    out: str = 'runs/ho'  # run folder for the ddpm.py checkpoint


def from_diffusers(sd, levels, num_res_blocks):
    """diffusers UNet2DModel state dict -> ddpm.UNet state dict (same module order: resnet, then its attention)."""
    new = {}

    def put(ours, theirs, reshape=False):
        for p in ('weight', 'bias'):
            w = sd.pop(f'{theirs}.{p}')
            new[f'{ours}.{p}'] = w[..., None, None] if reshape and p == 'weight' else w  # Linear -> 1x1 conv

    def block(ours, theirs, attn=None):
        for a, b in (('norm1', 'norm1'), ('conv1', 'conv1'), ('temb', 'time_emb_proj'), ('norm2', 'norm2'),
                     ('conv2', 'conv2'), ('skip', 'conv_shortcut')):
            if f'{theirs}.{b}.weight' in sd:
                put(f'{ours}.{a}', f'{theirs}.{b}')
        if attn and f'{attn}.to_q.weight' in sd:  # our qkv is one 1x1 conv with 3C outputs: [q; k; v]
            put(f'{ours}.attn.norm', f'{attn}.group_norm')
            for p in ('weight', 'bias'):
                w = torch.cat([sd.pop(f'{attn}.to_{c}.{p}') for c in 'qkv'])
                new[f'{ours}.attn.qkv.{p}'] = w[..., None, None] if p == 'weight' else w
            put(f'{ours}.attn.proj', f'{attn}.to_out.0', reshape=True)

    put('conv_in', 'conv_in'), put('temb.0', 'time_embedding.linear_1'), put('temb.2', 'time_embedding.linear_2')
    for side, per in (('down', num_res_blocks), ('up', num_res_blocks + 1)):
        k = 0
        for i in range(levels):
            for j in range(per):
                block(f'{side}.{k}', f'{side}_blocks.{i}.resnets.{j}', f'{side}_blocks.{i}.attentions.{j}')
                k += 1
            if i < levels - 1:
                put(f'{side}.{k}.1', f'{side}_blocks.{i}.{side}samplers.0.conv')
                k += 1
    block('mid.0', 'mid_block.resnets.0', 'mid_block.attentions.0'), block('mid.1', 'mid_block.resnets.1')
    put('norm_out', 'conv_norm_out'), put('conv_out', 'conv_out')
    if sd:
        common.fail(f'diffusers weights with no place in ddpm.UNet: {", ".join(list(sd)[:5])}')
    return new


def load_diffusers(folder):
    """(ddpm.UNet, ddpm.Config) from a folder with config.json + diffusion_pytorch_model.safetensors (or .bin)."""
    folder = Path(folder)
    if not (folder / 'config.json').exists():
        common.fail(f'{folder}: no config.json there (expected a diffusers UNet2DModel folder)')
    try:
        c = json.loads((folder / 'config.json').read_text())
        boc, downs, ch = c['block_out_channels'], c['down_block_types'], c['block_out_channels'][0]
        size, cin, _, _ = c['sample_size'], c['in_channels'], c['up_block_types'], c['layers_per_block']
    except (ValueError, KeyError, IndexError, TypeError) as e:
        common.fail(f'{folder}/config.json is not a diffusers UNet2DModel config ({type(e).__name__}: {e})')
    same = dict(flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6, attention_head_dim=None,
                norm_num_groups=32, act_fn='silu', time_embedding_type='positional', class_embed_type=None,
                resnet_time_scale_shift='default', mid_block_scale_factor=1, out_channels=c['in_channels'])
    bad = [f'{k}={c[k]!r} (need {v!r})' for k, v in same.items() if k in c and c[k] != v]
    bad += [f'block_out_channels={boc} (ddpm.GroupNorm has 32 groups from 128 channels on)'] * (min(boc) < 128)
    ups = [d.replace('Down', 'Up') for d in reversed(downs)]
    if bad or set(downs) - {'DownBlock2D', 'AttnDownBlock2D'} or c['up_block_types'] != ups:
        common.fail(f'{folder}: not the DDPM U-Net layout ddpm.UNet implements: {", ".join(bad) or downs}')
    sched = folder / 'scheduler_config.json'
    s = json.loads(sched.read_text()) if sched.exists() else {}
    if (s.get('beta_schedule', 'linear'), s.get('beta_start', 1e-4), s.get('beta_end', 0.02)) != ('linear', 1e-4, 0.02):
        common.fail(f'{sched}: only the linear 1e-4 -> 0.02 schedule of Ho et al. is supported')
    if not (dataset := next((k for k, v in common.DATASETS.items() if (v['channels'], v['size']) == (cin, size)), '')):
        common.fail(f'{folder}: {cin}x{size}x{size} images; ddpm.py knows 1x28x28 and 3x32x32 data')
    mcfg = ddpm.Config(dataset=dataset, ch=ch, ch_mult=','.join(str(b // ch) for b in boc),
                       num_res_blocks=c['layers_per_block'], dropout=0.0, T=s.get('num_train_timesteps', 1000),
                       attn_res=','.join(str(size >> i) for i, d in enumerate(downs) if d.startswith('Attn')),
                       var='large' if s.get('variance_type', 'fixed_large') == 'fixed_large' else 'small')
    st, pt = folder / 'diffusion_pytorch_model.safetensors', folder / 'diffusion_pytorch_model.bin'
    if st.exists():
        try:
            from safetensors.torch import load_file
        except ImportError:
            common.fail(f'{st} needs the safetensors package: pip install safetensors (or provide the .bin)')
        sd = load_file(st)
    elif pt.exists():
        sd = common.torch_load(pt, 'plain weights file')  # a pickle that would run code is refused, with the reason
    else:
        common.fail(f'{folder}: no diffusion_pytorch_model.safetensors or .bin')
    model = ddpm.make_model(mcfg, cin, size)
    model.load_state_dict(from_diffusers(dict(sd), len(boc), mcfg.num_res_blocks))
    return model, mcfg


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith('-'):  # the folder may come first, without --folder
        argv = ['--folder'] + argv
    cfg = common.parse_config(Config, argv=argv)
    if not cfg.folder:
        common.fail('give the diffusers folder: python exercises/ho_weights.py FOLDER --out RUN')
    model, mcfg = load_diffusers(cfg.folder)
    mcfg = dataclasses.replace(mcfg, out=cfg.out)
    common.claim(cfg.out)
    common.save_ckpt(Path(cfg.out) / 'ckpt.pt', dict(script='ddpm', model=model.state_dict(), ema=model.state_dict(),
                                                     step=0, config=dataclasses.asdict(mcfg)))
    print(f'{cfg.folder} -> {cfg.out}/ckpt.pt ({sum(p.numel() for p in model.parameters()):,} parameters, '
          f'T = {mcfg.T}, var {mcfg.var}); sample with: python ddim.py --out {cfg.out}')


if __name__ == '__main__':
    main()
