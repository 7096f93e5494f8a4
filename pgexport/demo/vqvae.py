"""The demo's mask VQ-VAE: 64 x 64 masks (a shape's, cropped to its box) <-> 16 codes of a 128-entry
codebook, as PaliGemma's segmentation tokens are. The decoder is big_vision's architecture at demo
widths (pgexport.exporters.seg_decoder.SegDecoder: widths 64, 64, 32, 16, 8; 0.27 M weights); the encoder,
needed only to write segment answers, is four stride-2 convs to 4 x 4 x 32.

    python -m pgexport.demo.vqvae [--steps N] [--out FILE]   # train and save (default: the shipped SEG_DECODER_FILE)

The file has vae-oid.npz's structure (`_vq_vae._embedding`, `decoder.*`), so `--seg-decoder` loads it
like Google's, plus this encoder's weights under `encoder.*` (vae-oid.npz holds its encoder there too).
Deterministic for a fixed thread count: torch's seed and scenes drawn from a fixed seed.
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pgexport.demo.task import SEG_DECODER_FILE, Scene, mask_crop, random_scene
from pgexport.exporters.seg_decoder import CODEBOOK, SegDecoder, load_seg_decoder

CODES, DIM = 128, 32
WIDTHS = (64, 64, 32, 16, 8)
STEPS, BATCH, LR = 600, 64, 2e-3


class Encoder(nn.Module):
    """mask [batch, 1, 64, 64] in -1..1 -> [batch, DIM, 4, 4]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                                 nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, DIM, 4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def nearest(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest codebook entry (squared distance)."""
    return ((flat ** 2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + (codebook ** 2).sum(1)).argmin(1)


def mask_batch(rng: random.Random, n: int) -> torch.Tensor:
    """n crops [n, 1, 64, 64] from fresh scenes, a fifth of them held-out B's kind of image."""
    crops: list[np.ndarray] = []
    while len(crops) < n:
        scene = random_scene(rng, other=rng.random() < 0.2)
        crops += [mask_crop(mask, box) for mask, box in zip(scene.masks, scene.boxes)]
    return torch.from_numpy(np.stack(crops[:n])[:, None].astype(np.float32))


def train(steps: int = STEPS, seed: int = 0, log=print) -> tuple[Encoder, SegDecoder]:
    """Train encoder, codebook and decoder together: reconstruction (BCE) + codebook + 0.25 x commitment,
    straight-through gradients."""
    torch.manual_seed(seed)
    rng = random.Random(f"vq-{seed}")
    encoder = Encoder()
    decoder = SegDecoder(torch.randn(CODES, DIM) * 0.1, WIDTHS)
    codebook = nn.Parameter(decoder.codebook.clone())
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(decoder.decoder.parameters()) + [codebook], lr=LR)
    started = time.perf_counter()
    for step in range(steps):
        x = mask_batch(rng, BATCH)
        flat = encoder(x * 2 - 1).permute(0, 2, 3, 1).reshape(-1, DIM)
        index = nearest(flat, codebook)
        q = codebook[index]
        straight = flat + (q - flat).detach()
        logits = decoder.decoder(straight.reshape(-1, 4, 4, DIM).permute(0, 3, 1, 2))
        recon = F.binary_cross_entropy_with_logits(logits, x)
        loss = recon + F.mse_loss(q, flat.detach()) + 0.25 * F.mse_loss(flat, q.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            with torch.no_grad():
                pred, truth = logits > 0, x > 0.5
                iou = ((pred & truth).sum((1, 2, 3)).float() / (pred | truth).sum((1, 2, 3)).float()).mean().item()
            log(f"vq-vae step {step + 1}/{steps}: loss {loss.item():.4f} mask IoU {iou:.3f} "
                f"codes in use {index.unique().numel()} ({time.perf_counter() - started:.0f} s)")
    with torch.no_grad():
        decoder.codebook.copy_(codebook)
    return encoder, decoder.eval()


def save(path: str | Path, encoder: Encoder, decoder: SegDecoder) -> None:
    """The npz: codebook and decoder under vae-oid.npz's names, the encoder under `encoder.*`."""
    arrays = {CODEBOOK: decoder.codebook.numpy()}
    arrays.update({f"decoder.{k}": v.numpy() for k, v in decoder.decoder.state_dict().items()})
    arrays.update({f"encoder.{k}": v.numpy() for k, v in encoder.state_dict().items()})
    with open(path, "wb") as handle:  # np.savez would append ".npz" to a name without it
        np.savez(handle, **arrays)


def load(path: str | Path) -> tuple[Encoder, SegDecoder]:
    """Encoder and decoder of a file `save` wrote, in eval mode."""
    decoder = load_seg_decoder(path)
    encoder = Encoder()
    with np.load(path, allow_pickle=False) as archive:
        encoder.load_state_dict({k[len("encoder."):]: torch.from_numpy(archive[k]) for k in archive.files
                                 if k.startswith("encoder.")})
    return encoder.eval(), decoder


@functools.cache
def shipped() -> tuple[Encoder, SegDecoder]:
    """The shipped VQ-VAE (SEG_DECODER_FILE), loaded once."""
    return load(SEG_DECODER_FILE)


def numpy_decode(decoder: SegDecoder | None = None):
    """codes [n, 16] -> mask logits [n, 64, 64] as NumPy through `decoder` (default: the shipped one):
    what pgexport.metrics.score_answers takes as `decode`."""
    def decode(codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (decoder or shipped()[1])(torch.from_numpy(np.asarray(codes))).numpy()
    return decode


@torch.no_grad()
def encode(encoder: Encoder, codebook: torch.Tensor, crops: np.ndarray) -> np.ndarray:
    """[n, 64, 64] bool masks -> [n, 16] codes."""
    flat = encoder(torch.from_numpy(crops[:, None].astype(np.float32)) * 2 - 1).permute(0, 2, 3, 1).reshape(-1, DIM)
    return nearest(flat, codebook).reshape(-1, 16).numpy()


def scene_codes(scene: Scene, model: tuple[Encoder, SegDecoder] | None = None) -> list[str]:
    """Each shape's 16 codes as `<segNNN>` text (default: the shipped VQ-VAE)."""
    encoder, decoder = model or shipped()
    crops = np.stack([mask_crop(mask, box) for mask, box in zip(scene.masks, scene.boxes)])
    return ["".join(f"<seg{c:03d}>" for c in row) for row in encode(encoder, decoder.codebook, crops)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the demo's mask VQ-VAE (its decoder is the demo's seg_decoder).")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    parser.add_argument("--out", type=Path, default=SEG_DECODER_FILE, help="npz to write (default: the shipped one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    encoder, decoder = train(args.steps)
    save(args.out, encoder, decoder)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
