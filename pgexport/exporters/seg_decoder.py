"""PaliGemma's segmentation decoder: 16 `<segNNN>` codes -> a 64 x 64 mask, as a PyTorch module read
from big_vision's `vae-oid.npz`, exported to ONNX (onnx/seg_decoder.onnx) and checked against itself.

The architecture is big_vision's (evaluators/proj/paligemma/transfers/segmentation.py, `Decoder`):
each code picks a row of the VQ-VAE codebook; the 16 rows are a 4 x 4 grid (row-major), which a 1x1
conv (+ReLU), two residual blocks (3x3 conv, ReLU, 3x3 conv, ReLU, 1x1 conv, plus the input) and four
stride-2 transposed convs (kernel 4, +ReLU each) grow to 64 x 64; a last 1x1 conv gives one channel,
the mask logits (big_vision: "in range [-1, 1]"; a pixel is in the mask when its logit is > 0).

The npz holds the weights of the PyTorch module big_vision's Flax code was converted from, under its
names: `_vq_vae._embedding` [codes, dim] and `decoder.{0,2,3,4,6,8,10,12}` (nn.Sequential indices;
2 and 3 are the residual blocks, with convs at `.net.0`, `.net.2`, `.net.4`). Those names and
layouts are used as they are, so the module here is that nn.Sequential: Conv2d and ConvTranspose2d
(weights [in, out, 4, 4], padding 1). big_vision's Flax `ConvTranspose(padding=2,
transpose_kernel=True)` on the same weights transposed (2, 3, 1, 0) is the same operation
(benchmarks/seg_decoder_flax_check.py compares the two on random weights). Widths and the codebook
size are read from the file, so a smaller decoder of the same structure (the demo's) loads too.
The encoder's weights, also in vae-oid.npz, are not read.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pgexport.contract import SEG_CODES, SEG_DECODER, SEG_MASK_SIZE
from pgexport.errors import BadInputError
from pgexport.manifest import sha256_file

CODEBOOK = "_vq_vae._embedding"
# nn.Sequential indices of the decoder's weighted layers: 1x1 conv, two residual blocks, four
# transposed convs, the last 1x1 conv (ReLUs at the odd indices between them).
CONV_IN, RESBLOCKS, UPSAMPLES, CONV_OUT = 0, (2, 3), (4, 6, 8, 10), 12
RESBLOCK_CONVS = (0, 2, 4)  # a residual block's net: conv 3x3, ReLU, conv 3x3, ReLU, conv 1x1
GRID = 4  # the 16 codes as 4 x 4 (row-major)


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(width, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class SegDecoder(nn.Module):
    """codes [batch, 16] (int) -> mask logits [batch, 64, 64] (fp32): big_vision's decoder."""

    def __init__(self, codebook: torch.Tensor, widths: tuple[int, ...]):
        super().__init__()
        dim = codebook.shape[1]
        self.register_buffer("codebook", codebook.clone())
        width, up = widths[0], widths[1:]
        layers = [nn.Conv2d(dim, width, 1), nn.ReLU(), ResBlock(width), ResBlock(width)]
        for out in up:
            layers += [nn.ConvTranspose2d(width, out, 4, stride=2, padding=1), nn.ReLU()]
            width = out
        layers.append(nn.Conv2d(width, 1, 1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        embedded = self.codebook[codes.long()]  # [batch, 16, dim]
        grid = embedded.reshape(-1, GRID, GRID, embedded.shape[-1]).permute(0, 3, 1, 2)  # NHWC -> NCHW
        return self.decoder(grid)[:, 0]

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise BadInputError(f"--seg-decoder {path}: no such file (give the path of vae-oid.npz)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = [name for name in archive.files if name == CODEBOOK or name.startswith("decoder.")]
            return {name: np.asarray(archive[name]) for name in names}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise BadInputError(f"--seg-decoder {path}: not a readable .npz file ({error})") from None


def load_seg_decoder(path: str | Path) -> SegDecoder:
    """The decoder of an npz with vae-oid.npz's structure, in fp32 and eval mode. A missing weight, a
    shape that does not fit the architecture, or a non-finite value is a BadInputError (exit 4)
    naming it, before any model is loaded."""
    path = Path(path)
    weights = _read_npz(path)
    where = f"--seg-decoder {path}"
    needed = [CODEBOOK] + [f"decoder.{i}.{kind}" for i in (CONV_IN, *UPSAMPLES, CONV_OUT) for kind in ("weight", "bias")]
    needed += [f"decoder.{b}.net.{c}.{kind}" for b in RESBLOCKS for c in RESBLOCK_CONVS for kind in ("weight", "bias")]
    missing = [name for name in needed if name not in weights]
    if missing:
        raise BadInputError(f"{where}: not a PaliGemma segmentation decoder (vae-oid.npz structure): "
                            f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    codebook = weights[CODEBOOK]
    if codebook.ndim != 2 or codebook.shape[0] < 1:
        raise BadInputError(f"{where}: {CODEBOOK} has shape {list(codebook.shape)}, not [codes, dim]")
    flat = [name for name in needed[1:] if name.endswith(".bias") and weights[name].ndim != 1]
    if flat:
        raise BadInputError(f"{where}: {flat[0]} has shape {list(weights[flat[0]].shape)}, not [channels]")
    # Each layer's width from its bias (one number per output channel), so a weight that disagrees is named.
    widths = tuple(weights[f"decoder.{i}.bias"].shape[0] for i in (CONV_IN, *UPSAMPLES))
    module = SegDecoder(torch.from_numpy(codebook.astype(np.float32)), widths)
    state = {name: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)) for name, value in weights.items()
             if name != CODEBOOK}
    expected = {name: tuple(t.shape) for name, t in module.decoder.state_dict().items()}
    for name, shape in expected.items():
        given = tuple(state[f"decoder.{name}"].shape)
        if given != shape:
            raise BadInputError(f"{where}: decoder.{name} has shape {list(given)}; the architecture needs {list(shape)}")
    module.decoder.load_state_dict({name[len("decoder."):]: state[name] for name in (f"decoder.{n}" for n in expected)})
    for name, value in weights.items():
        if not np.isfinite(value).all():
            raise BadInputError(f"{where}: {name} holds NaN or infinite values")
    return module.eval()


def describe(path: str | Path, module: SegDecoder) -> dict:
    """The manifest's record of a decoder: its file's name and sha256, codebook size and dim, weights."""
    path = Path(path)
    return {
        "source": path.name,
        "sha256": sha256_file(path),
        "codebook_size": module.codebook_size,
        "embedding_dim": int(module.codebook.shape[1]),
        "parameters": sum(p.numel() for p in module.parameters()),
    }


def probe_codes(codebook_size: int, rows: int = 32, seed: int = 0) -> np.ndarray:
    """Code rows the parity checks run: every code at least once (row r holds codes 16r.. in turn),
    then seeded random rows. [rows', 16] int64."""
    every = np.arange(-(-codebook_size // SEG_CODES) * SEG_CODES) % codebook_size
    random = np.random.default_rng(seed).integers(0, codebook_size, (rows, SEG_CODES))
    return np.concatenate([every.reshape(-1, SEG_CODES), random]).astype(np.int64)


def reference_logits(module: SegDecoder, codes: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(codes)).numpy()


# fp32 against fp32: the same convolutions summed in another order (oneDNN / MLAS kernels, Winograd
# or direct). Each output is a chain of dot products of at most 9 x 128 = 1152 terms; with fp32's
# unit roundoff u = 6e-8 a sum's rounding is below n u sum|terms| (3e-5 relative for 512 terms
# typical), so 1e-4 of the largest |logit| bounds the difference between two correct orders of
# summation with room, and a wrong weight layout (a flipped or transposed kernel) is off by O(1).
MAX_REL_DIFF = 1e-4


def compare_masks(reference: np.ndarray, candidate: np.ndarray, bound: float = MAX_REL_DIFF) -> dict:
    """Mask logits of a candidate (ONNX, a trace, Core ML) against the PyTorch reference: the largest
    difference, it relative to the largest |logit|, and the IoU of the thresholded masks (> 0), over
    every pixel and over the pixels whose reference is further from 0 than the bound (those no
    rounding within it can flip: that IoU must be 1.0)."""
    scale = max(float(np.abs(reference).max()), 1e-12)
    diff = float(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max())
    ref_mask, cand_mask = reference > 0, candidate > 0
    clear = np.abs(reference) > bound * scale

    def iou(keep: np.ndarray) -> float:
        union = (ref_mask | cand_mask)[keep].sum()
        return float((ref_mask & cand_mask)[keep].sum() / union) if union else 1.0

    report = {"rows": int(reference.shape[0]), "max_abs_diff": diff, "max_rel_diff": diff / scale,
              "max_abs_logit": scale, "mask_iou": iou(np.ones_like(clear)), "mask_iou_clear": iou(clear),
              "flipped_pixels": int((ref_mask != cand_mask).sum()), "bound_rel": bound}
    report["passed"] = report["max_rel_diff"] <= bound and report["mask_iou_clear"] == 1.0
    return report


def parity_failure(parity: dict) -> str:
    """What a failed `compare_masks` report says, in one line."""
    return (f"seg decoder parity failed ({parity['hop']}): max relative difference {parity['max_rel_diff']:.3g} "
            f"(bound {parity['bound_rel']:g}), mask IoU {parity['mask_iou_clear']:.6f} where no rounding can flip it (needs 1.0)")


def export_seg_decoder(module: SegDecoder, out_dir: str | Path, opset: int) -> Path:
    """onnx/seg_decoder.onnx: codes [batch_size, 16] int64 -> mask_logits [batch_size, 64, 64]."""
    import onnx

    from pgexport.exporters.onnx import quiet_exporter

    path = Path(out_dir) / SEG_DECODER.filename()
    example = (torch.from_numpy(probe_codes(module.codebook_size)[:3]),)  # batch 3: the exporter specialises 0 and 1
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            module, example, input_names=SEG_DECODER.input_names(), output_names=SEG_DECODER.output_names(),
            dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), opset_version=opset, dynamo=True,
        )
        program.save(str(path))
    proto = onnx.load(str(path))
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_param = "batch_size"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    return path


def onnx_parity(module: SegDecoder, path: str | Path) -> dict:
    """onnx/seg_decoder.onnx on ONNX Runtime against the PyTorch module, on `probe_codes`."""
    from pgexport.sessions import open_session

    codes = probe_codes(module.codebook_size)
    session = open_session(Path(path))
    candidate = session.run(None, {SEG_DECODER.inputs[0].name: codes})[0]
    assert candidate.shape[1:] == (SEG_MASK_SIZE, SEG_MASK_SIZE), candidate.shape
    return {"hop": "PyTorch -> ONNX Runtime (fp32)", **compare_masks(reference_logits(module, codes), candidate)}


def write_random_npz(path: str | Path, codebook_size: int = 128, dim: int = 512,
                     widths: tuple[int, ...] = (128, 128, 64, 32, 16), seed: int = 0, last_scale: float = 40.0) -> Path:
    """An npz with vae-oid.npz's structure and random weights (PyTorch's default init, a unit-normal
    codebook), plus a few encoder weights the loader must skip: what tests and the Flax cross-check
    load in place of the real file, which these machines cannot download. The last conv's weights
    are scaled by `last_scale`: with the default init the logits are about 0.02, and 40x spreads them
    to about +-0.4, and the last bias is set to put the median logit of `probe_codes` at 0: masks
    with pixels on both sides of it, as a trained decoder's are."""
    torch.manual_seed(seed)
    module = SegDecoder(torch.randn(codebook_size, dim), widths)
    with torch.no_grad():
        module.decoder[-1].weight.mul_(last_scale)
        module.decoder[-1].bias.sub_(module(torch.from_numpy(probe_codes(codebook_size))).median())
    arrays = {CODEBOOK: module.codebook.numpy()}
    arrays.update({f"decoder.{name}": value.numpy() for name, value in module.decoder.state_dict().items()})
    arrays.update({"encoder.0.weight": np.zeros((widths[-1], 1, 4, 4), np.float32),
                   "encoder.0.bias": np.zeros(widths[-1], np.float32)})
    path = Path(path)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path
