"""MAE's speed advantage: a training step with the encoder on the visible tokens only, against the
same step with the encoder run on all tokens.

    python benchmarks/mae_speed.py                      # CPU, ViT-Ti/4 at 32 px, batch 128, 75% masked
    python benchmarks/mae_speed.py --device cuda --batch-size 512

Both steps do forward + backward + AdamW update with the same masking, the same decoder and the
same loss. The "all tokens" step replaces the masked patch embeddings by a learnable mask token
and encodes every token (SimMIM-style), then hands all encoded tokens to the decoder in raster
order. The two kinds of step alternate, so a busy machine slows both alike; the median is printed,
in wall-clock time and in CPU time of this process (on a shared CPU, where other jobs stretch the
wall clock of short steps most, the CPU time is the steadier measure of the work done).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from measure import synchronize  # benchmarks/measure.py, next to this script

from ssl_vit.backbone import BackboneConfig, build_backbone
from ssl_vit.data import MEAN, STD
from ssl_vit.masking import random_masking
from ssl_vit.objectives import DataInfo
from ssl_vit.objectives.mae import MAE, MAEConfig


def mae_loss(mae: MAE, images: torch.Tensor) -> torch.Tensor:
    """The real MAE step: the encoder sees the class token and the visible tokens."""
    return mae({"image": images})[0]


def all_tokens_loss(mae: MAE, encoder_mask_token: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The same masking, decoder and loss, with the encoder run on all N tokens."""
    bb = mae.backbone
    grid = bb.grid_size(images)
    b, n = len(images), grid[0] * grid[1]
    masking = random_masking(b, n, mae.cfg.mask_ratio, images.device)
    tokens = torch.where(masking.mask.unsqueeze(-1), encoder_mask_token, bb.embed(images))  # [B, N, D]
    latent = bb.encode(tokens, grid)  # [B, 1 + N, D]
    in_order = torch.arange(n, device=images.device).expand(b, n)  # nothing to unshuffle
    pred = mae.forward_decoder(latent, in_order, grid)
    return mae.forward_loss(images, pred, masking.mask)


def time_step(loss_fn, optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[float, float]:
    """One training step -> (wall seconds, CPU seconds of this process, all threads)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny")
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--depth", type=int, default=None, help="encoder layers (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind (after 1 warm-up step)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    backbone = build_backbone(BackboneConfig(model=args.model, patch_size=args.patch_size, img_size=args.img_size,
                                             depth=args.depth, pos_embed="sincos"))
    data = DataInfo("random", None, None, MEAN, STD, args.img_size)
    mae = MAE(backbone, MAEConfig(mask_ratio=args.mask_ratio), data).to(device).train()
    encoder_mask_token = torch.nn.Parameter(torch.zeros(1, 1, backbone.embed_dim, device=device))
    optimizer = torch.optim.AdamW([*mae.parameters(), encoder_mask_token], lr=1e-4, betas=(0.9, 0.95))
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)

    steps = {
        "MAE (encoder on visible tokens)": lambda: mae_loss(mae, images),
        "encoder on all tokens": lambda: all_tokens_loss(mae, encoder_mask_token, images),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for i in range(args.steps + 1):
        for name, loss_fn in steps.items():
            t = time_step(loss_fn, optimizer, device)
            if i > 0:  # the first step of each kind warms up allocators and kernels
                times[name].append(t)

    grid = backbone.grid_size(images)
    print(f"{args.model}/{args.patch_size} at {args.img_size} px ({grid[0] * grid[1]} tokens), "
          f"depth {len(backbone.vit.blocks)}, batch {args.batch_size}, mask ratio {args.mask_ratio}, "
          f"{device}, {torch.get_num_threads()} threads; median of {args.steps} steps (forward + backward + AdamW)")
    wall = {name: statistics.median(t for t, _ in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(c for _, c in ts) for name, ts in times.items()}
    for name in steps:
        print(f"  {name:34s} {wall[name] * 1000:8.1f} ms/step wall ({args.batch_size / wall[name]:6.1f} img/s), "
              f"{cpu[name] * 1000:8.1f} ms/step CPU")
    (mae_name, full_name) = steps
    print(f"  speed-up of MAE: {wall[full_name] / wall[mae_name]:.2f}x wall, {cpu[full_name] / cpu[mae_name]:.2f}x CPU")


if __name__ == "__main__":
    main()
