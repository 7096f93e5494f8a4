"""One graph of an artifact in int8-static against the fp32 graphs, on the parity gate's 3 prompts:
the cosine of the prompt embeddings (image positions included) and of the last-position logits,
per prompt. ARTIFACT holds both precisions of GRAPH (e.g. `pgexport quantize ART -o ARTIFACT
--vision int8-static --no-validate`).

    python benchmarks/static_graph_check.py ARTIFACT vision_encoder|decoder_model_merged

Results: benchmarks/results/quantize_static.md ("The patch embedding")."""
import sys

import numpy as np

from pgexport.metrics import row_cosines
from pgexport.runtime import OnnxPaliGemma
from pgexport.validate import default_samples
from pgexport.contract import DECODER, LOGITS

art, graph = sys.argv[1], sys.argv[2]
images, prompts = zip(*default_samples())
def cos(a, b):  # per prompt, over everything else, in float64
    return row_cosines(a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64))
res = {}
for name, dtype in (("fp32", "fp32"), ("static", {graph: "int8-static"})):
    rt = OnnxPaliGemma(art, dtype=dtype, low_memory=True)
    inputs = rt.preprocess(list(images), list(prompts))
    embeds = rt.prefill_embeds(inputs["input_ids"], inputs["pixel_values"])
    feed = rt.prefill_feed(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], embeds=embeds)
    logits = [rt.sessions[DECODER.name].run([LOGITS], {k: v[r:r+1] if v.ndim else v for k, v in feed.items()})[0][:, -1]
              for r in range(inputs["input_ids"].shape[0])]
    res[name] = (embeds, np.concatenate(logits))
    del rt
print(graph, "embeds cos per row", cos(res["fp32"][0], res["static"][0]))
print(graph, "last-position logits cos per row", cos(res["fp32"][1], res["static"][1]))
print("embeds max|fp32|", float(np.abs(res["fp32"][0]).max()), "max|d|", float(np.abs(res["fp32"][0]-res["static"][0]).max()))
