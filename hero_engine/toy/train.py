"""Train the toy model from procedural data (CPU-friendly).

    python -m hero_engine.toy.train --out hero_engine/toy/weights --steps N --seed 0

Writes ``toy_model.safetensors`` (EMA weights; ``unet.*`` and ``text_encoder.*``) and ``toy_model.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .data import sample_batch
from .model import ToyModel, default_config


def save(model: ToyModel, ema: dict, out: Path, meta: dict) -> None:
    """Write the EMA weights (fp32) and the config json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    names = {**{f"unet.{k}": k for k in model.unet.state_dict()},
             **{f"text_encoder.{k}": k for k in model.text_encoder.state_dict()}}
    sd = {full: ema[full].detach().float().contiguous().clone() for full in names}
    save_file(sd, str(out / "toy_model.safetensors"), metadata={k: str(v) for k, v in meta.items()})
    (out / "toy_model.json").write_text(json.dumps({**model.config, "training": meta}, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="hero_engine/toy/weights")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting (0 = plain MSE)")
    ap.add_argument("--init", default=None, help="warm-start from a weights dir (continue training)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = ToyModel(default_config())
    unet, te = model.unet, model.text_encoder
    if args.init:
        from safetensors.torch import load_file

        sd = load_file(str(Path(args.init) / "toy_model.safetensors"))
        unet.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("unet.")})
        te.load_state_dict({k[13:]: v.float() for k, v in sd.items() if k.startswith("text_encoder.")})
    unet.train()
    te.train()
    params = list(unet.parameters()) + list(te.parameters())
    print(f"params: unet {sum(p.numel() for p in unet.parameters())/1e6:.2f}M, "
          f"text {sum(p.numel() for p in te.parameters())/1e6:.3f}M", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    warm = min(200, args.steps // 10)

    def lr_factor(s: int) -> float:  # linear warm-up, then cosine from 1 to 0.1
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
        return min(1.0, (s + 1) / max(1, warm)) * (0.1 + 0.9 * cos)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    named = {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
             **{f"text_encoder.{k}": v for k, v in te.state_dict().items()}}
    ema = {k: v.detach().clone().float() for k, v in named.items()}
    ac = model.alphas_cumprod
    t0, run = time.time(), 0.0
    for step in range(1, args.steps + 1):
        imgs, prompts = sample_batch(rng, args.batch)
        drop = rng.random(args.batch) < args.uncond_prob
        prompts = ["" if d else p for d, p in zip(drop, prompts)]
        x0 = torch.from_numpy(imgs) * 2 - 1
        t = torch.randint(0, len(ac), (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        ab = ac[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        eps = unet(xt, t, encoder_hidden_states=model.encode_prompts(prompts)).sample
        per = (eps - noise).pow(2).mean(dim=(1, 2, 3))
        if args.min_snr > 0:  # min-SNR-gamma weighting for eps prediction: min(snr, gamma) / snr
            snr = ab.flatten() / (1 - ab.flatten())
            per = per * snr.clamp(max=args.min_snr) / snr
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in named.items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        run = loss.item() if step == 1 else 0.98 * run + 0.02 * loss.item()
        if step % args.log_every == 0 or step == args.steps:
            el = time.time() - t0
            print(f"step {step}/{args.steps} loss {run:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{el/60:.1f} min ({el/step:.2f} s/step)", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            meta = dict(steps=step, batch=args.batch, lr=args.lr, ema=args.ema, seed=args.seed,
                        uncond_prob=args.uncond_prob, min_snr=args.min_snr, init=args.init,
                        wall_s=round(time.time() - t0, 1),
                        command=f"python -m hero_engine.toy.train --out {args.out} --steps {args.steps} "
                                f"--seed {args.seed} --threads {args.threads}")
            save(model, ema, Path(args.out), meta)


if __name__ == "__main__":
    main()
