"""Demo v2 prototype (issue 16, part 3): a VQ-VAE over box-cropped shape masks (64 x 64), its decoder
in vae-oid.npz's structure, so that pgexport's --seg-decoder loads it.

    .venv/bin/python benchmarks/demo_v2/vqvae.py [STEPS]   # writes $DEMO_V2_WORK (/tmp/demo_v2)/demo-seg.npz, vq.pt

Results: benchmarks/demo_v2/README.md."""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
WORK = Path(os.environ.get("DEMO_V2_WORK", "/tmp/demo_v2"))
from scenes import mask_crop, random_scene  # noqa: E402

from pgexport.exporters.seg_decoder import SegDecoder, CODEBOOK  # noqa: E402

CODES, DIM = 128, 32
WIDTHS = (64, 64, 32, 16, 8)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                                 nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, DIM, 4, 2, 1))

    def forward(self, x):
        return self.net(x)


def masks_batch(rng, n):
    out = []
    while len(out) < n:
        scene = random_scene(rng, other=rng.random() < 0.2)
        for mask, box in zip(scene.masks, scene.boxes):
            out.append(mask_crop(mask, box))
    return torch.from_numpy(np.stack(out[:n])[:, None].astype(np.float32))


def train(steps=1500, batch=64, seed=0):
    torch.manual_seed(seed)
    rng = random.Random(f"vq-{seed}")
    encoder = Encoder()
    decoder = SegDecoder(torch.randn(CODES, DIM) * 0.1, WIDTHS)
    codebook = nn.Parameter(decoder.codebook.clone())
    params = list(encoder.parameters()) + list(decoder.decoder.parameters()) + [codebook]
    opt = torch.optim.Adam(params, lr=2e-3)
    t = time.time()
    for step in range(steps):
        x = masks_batch(rng, batch)
        z = encoder(x * 2 - 1)  # [b, D, 4, 4]
        flat = z.permute(0, 2, 3, 1).reshape(-1, DIM)
        d = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + (codebook ** 2).sum(1)
        idx = d.argmin(1)
        q = codebook[idx]
        commit = F.mse_loss(flat, q.detach())
        book = F.mse_loss(q, flat.detach())
        q_st = flat + (q - flat).detach()
        grid = q_st.reshape(-1, 4, 4, DIM).permute(0, 3, 1, 2)
        logits = decoder.decoder(grid)
        recon = F.binary_cross_entropy_with_logits(logits, x)
        loss = recon + book + 0.25 * commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            with torch.no_grad():
                pred = logits > 0
                inter = (pred & (x > 0.5)).sum((1, 2, 3)).float()
                union = (pred | (x > 0.5)).sum((1, 2, 3)).float()
                iou = (inter / union).mean().item()
            print(f"step {step} loss {loss.item():.4f} recon {recon.item():.4f} iou {iou:.4f} used {idx.unique().numel()} {time.time()-t:.0f}s", flush=True)
    with torch.no_grad():
        decoder.codebook.copy_(codebook)
    return encoder, decoder


def encode(encoder, codebook, crops: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        z = encoder(torch.from_numpy(crops[:, None].astype(np.float32)) * 2 - 1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, DIM)
        d = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + (codebook ** 2).sum(1)
        return d.argmin(1).reshape(-1, 16).numpy()


if __name__ == "__main__":
    encoder, decoder = train(int(sys.argv[1]) if len(sys.argv) > 1 else 1500)
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save({"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}, WORK / "vq.pt")
    arrays = {CODEBOOK: decoder.codebook.numpy()}
    arrays.update({f"decoder.{k}": v.numpy() for k, v in decoder.decoder.state_dict().items()})
    np.savez(WORK / "demo-seg.npz", **arrays)
    # How many distinct code rows the shapes get, and the decode IoU on fresh crops.
    rng = random.Random("vq-eval")
    crops, kinds = [], []
    for _ in range(300):
        scene = random_scene(rng, other=rng.random() < 0.5)
        for shape, mask, box in zip(scene.shapes, scene.masks, scene.boxes):
            crops.append(mask_crop(mask, box))
            kinds.append(shape.kind)
    crops = np.stack(crops)
    codes = encode(encoder, decoder.codebook, crops)
    with torch.no_grad():
        logits = decoder(torch.from_numpy(codes)).numpy()
    pred = logits > 0
    iou = ((pred & crops).sum((1, 2)) / (pred | crops).sum((1, 2)))
    print("decode IoU mean", iou.mean(), "min", iou.min())
    for kind in ("circle", "square", "triangle"):
        rows = {tuple(c) for c, k in zip(codes, kinds) if k == kind}
        print(kind, len(rows), "distinct code rows of", kinds.count(kind))
