"""Cross-check pgexport's PyTorch segmentation decoder against the Flax decoder big_vision runs.

big_vision decodes PaliGemma's 16 <segNNN> codes with a Flax module (Conv 1x1, two residual
blocks, four `nn.ConvTranspose(kernel 4, stride 2, padding=2, transpose_kernel=True)`, Conv 1x1)
on vae-oid.npz's PyTorch weights, each conv kernel transposed (2, 3, 1, 0). pgexport runs those
weights untransposed in torch's Conv2d / ConvTranspose2d(padding=1). This script checks that the two
readings agree on an npz of the same structure (random weights: these machines cannot download
vae-oid.npz). The Flax module below is written from big_vision's description of its decoder
(evaluators/proj/paligemma/transfers/segmentation.py), layer for layer.

Three steps, two Python environments (jax and flax are not pgexport dependencies):

    .venv/bin/python benchmarks/seg_decoder_flax_check.py prepare /tmp/segcheck      # npz, codes, torch + ONNX logits
    python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax flax numpy
    /tmp/jaxenv/bin/python benchmarks/seg_decoder_flax_check.py flax /tmp/segcheck   # Flax logits
    .venv/bin/python benchmarks/seg_decoder_flax_check.py compare /tmp/segcheck      # the table

Result recorded in benchmarks/results/seg_decoder.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def prepare(folder: Path) -> None:
    from pgexport.exporters import seg_decoder as sd

    folder.mkdir(parents=True, exist_ok=True)
    sd.write_random_npz(folder / "vae.npz", seed=1)  # the real file's shapes, logits about +-0.4
    module = sd.load_seg_decoder(folder / "vae.npz")
    codes = sd.probe_codes(module.codebook_size, rows=64, seed=1)
    np.save(folder / "codes.npy", codes)
    np.save(folder / "torch.npy", sd.reference_logits(module, codes))
    onnx_path = sd.export_seg_decoder(module, folder, 18)
    from pgexport.sessions import open_session

    np.save(folder / "onnx.npy", open_session(onnx_path).run(None, {"codes": codes})[0])


def flax_logits(folder: Path) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Residual(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            y = nn.relu(nn.Conv(self.features, (3, 3), padding=1)(x))
            y = nn.relu(nn.Conv(self.features, (3, 3), padding=1)(y))
            return x + nn.Conv(self.features, (1, 1), padding=0)(y)

    class FlaxDecoder(nn.Module):
        widths: tuple

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(self.widths[0], (1, 1), padding=0)(x))
            x = Residual(self.widths[0])(x)
            x = Residual(self.widths[0])(x)
            for width in self.widths[1:]:
                x = nn.relu(nn.ConvTranspose(width, (4, 4), strides=(2, 2), padding=2, transpose_kernel=True)(x))
            return nn.Conv(1, (1, 1), padding=0)(x)

    with np.load(folder / "vae.npz") as archive:
        weights = dict(archive)

    def conv(name):
        return {"bias": weights[name + ".bias"], "kernel": np.transpose(weights[name + ".weight"], (2, 3, 1, 0))}

    def residual(name):
        return {f"Conv_{i}": conv(f"{name}.{index}") for i, index in enumerate((0, 2, 4))}

    params = {"Conv_0": conv("decoder.0"), "Residual_0": residual("decoder.2.net"), "Residual_1": residual("decoder.3.net"),
              **{f"ConvTranspose_{i}": conv(f"decoder.{index}") for i, index in enumerate((4, 6, 8, 10))},
              "Conv_1": conv("decoder.12")}
    widths = (weights["decoder.0.weight"].shape[0], *(weights[f"decoder.{i}.weight"].shape[1] for i in (4, 6, 8, 10)))
    codes = np.load(folder / "codes.npy")
    embedded = jnp.take(weights["_vq_vae._embedding"], codes.reshape(-1), axis=0).reshape(codes.shape[0], 4, 4, -1)
    out = jax.jit(lambda x: FlaxDecoder(widths).apply({"params": params}, x))(embedded)
    np.save(folder / "flax.npy", np.asarray(out)[..., 0])
    (folder / "flax_versions.json").write_text(json.dumps({"jax": jax.__version__, "flax": __import__("flax").__version__}))


def compare(folder: Path) -> None:
    from pgexport.exporters.seg_decoder import compare_masks

    flax = np.load(folder / "flax.npy")
    versions = json.loads((folder / "flax_versions.json").read_text())
    print(f"| candidate vs Flax (jax {versions['jax']}, flax {versions['flax']}) | rows | max abs diff | max rel diff "
          "| max abs logit | mask IoU | flipped pixels |")
    print("|---|---|---|---|---|---|---|")
    for name in ("torch", "onnx"):
        report = compare_masks(flax, np.load(folder / f"{name}.npy"))
        print(f"| {name} | {report['rows']} | {report['max_abs_diff']:.3g} | {report['max_rel_diff']:.3g} | "
              f"{report['max_abs_logit']:.3g} | {report['mask_iou']:.6f} | {report['flipped_pixels']} |")
    inside = float((flax > 0).mean())
    print(f"\nshare of pixels inside the Flax masks: {inside:.3f}")


if __name__ == "__main__":
    step, folder = sys.argv[1], Path(sys.argv[2])
    {"prepare": prepare, "flax": flax_logits, "compare": compare}[step](folder)
