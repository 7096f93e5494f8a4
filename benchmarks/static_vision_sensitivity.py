"""Which op class of a SigLIP-So400m-width vision encoder breaks static int8: each class quantized
alone (pgexport.quantize.static, every other MatMul/Conv excluded), the image features' cosine
against fp32 on the default calibration images. A random checkpoint with So400m widths, LAYERS
vision layers and a 1-layer tiny decoder, written and exported under WORK.

    python benchmarks/static_vision_sensitivity.py LAYERS [WORK]

It names the classes by weight shape (qkv, out_proj, fc1, fc2, projector) and the patch Conv.
The quantizer keeps the Conv in fp32 since this measurement; the script lets it quantize the Conv
too (static.COMPUTE_OPS), and asks for each class by excluding the others. "all" is every
MatMul and the Conv (the former default), "default" what `pgexport quantize` writes now.
Results: benchmarks/results/quantize_static.md ("The patch embedding")."""
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pgexport import random_model as rm
from pgexport.metrics import row_cosines
from pgexport.quantize.calibration import calibration_feeds
from pgexport.quantize import static
from pgexport.quantize.static import quantize_static_int8
layers = int(sys.argv[1])
work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(f"/tmp/pgexport-bench/static-vision-L{layers}")
rm.PRESETS["visexp"] = (dict(rm._SIGLIP_SO400M, num_hidden_layers=layers),
                        dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=32), 224, None)
if not (work / "art" / "manifest.json").exists():
    rm.random_checkpoint("visexp", work / "ck")
    from pgexport.pipeline import export_onnx
    export_onnx(work / "ck", work / "art", validate=False, progress=False)
src = work / "art" / "onnx" / "vision_encoder.onnx"
feeds = calibration_feeds(work / "art", "vision_encoder")
sess = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
ref = [sess(src).run(None, f)[0] for f in feeds]
m = onnx.load(str(src), load_external_data=False)
shapes = {i.name: tuple(i.dims) for i in m.graph.initializer}
classes = {}
for n in m.graph.node:
    if n.op_type == "Conv": classes[n.name] = "patch_conv"; continue
    if n.op_type != "MatMul" or n.input[1] not in shapes: continue
    k, nn = shapes[n.input[1]]
    c = ("fc1" if nn == 4304 else "fc2" if k == 4304 else "projector" if nn == 64 else
         "qkv" if n.input[0].startswith("layer_norm") else "out_proj")
    classes[n.name] = c
print({c: list(classes.values()).count(c) for c in set(classes.values())})
def cos(a, b):  # over the whole array, in float64
    return float(row_cosines(a.reshape(1, -1).astype(np.float64), b.reshape(1, -1).astype(np.float64))[0])
default_ops = static.COMPUTE_OPS
for only in ["default", "all", *sorted(set(classes.values()))]:
    static.COMPUTE_OPS = default_ops if only == "default" else (*default_ops, "Conv")
    exclude = [] if only in ("default", "all") else [n for n, c in classes.items() if c != only]
    dst = work / f"q_{only}.onnx"
    quantize_static_int8(src, dst, feeds, exclude_nodes=exclude, progress=False)
    out = [sess(dst).run(None, f)[0] for f in feeds]
    print(layers, only, "features cos per image", [round(cos(r, o), 4) for r, o in zip(ref, out)],
          "max|fp32|", round(float(max(np.abs(r).max() for r in ref)), 2), flush=True)
