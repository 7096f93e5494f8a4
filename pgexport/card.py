"""README.md for every folder pgexport writes: a Hugging Face Hub model card.

YAML front matter with the Hub's metadata (license, base_model, pipeline_tag, library_name, tags),
then what the folder is, its parity and size tables, its source checkpoint and hash, and how to run
it (Python, transformers.js, or Swift for Core ML). Every figure is rendered from the fields that
go into the folder's manifest.json (a student's from its report.json), never typed by hand.

`write_card` puts it into the staging folder just before `write_manifest`, so manifest.json lists
and hashes it and `pgexport verify` covers it. Torch-free.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

import pgexport
from pgexport.contract import COREML_DECODER, COREML_VISION, GRAPH_NAMES
from pgexport.demo import is_demo as is_demo_source
from pgexport.structured import JS_FILE, SWIFT_FILE

CARD = "README.md"
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
# The demo model is trained by this project on synthetic data with its own tokenizer (no Gemma
# weights), and ships inside the package: it is under the project's license (pyproject.toml).
PROJECT_LICENSE = "apache-2.0"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# Precisions whose graph files transformers.js loads by the same dtype name (suffixes _int8, ...)
# and that tests/test_transformersjs.py runs there; the snippet picks the last variant made of them.
TRANSFORMERS_JS_CHECKED = ("fp32", "int8")
COREML_TAGS = {"none": "fp16", "int8": "int8", "int4": "int4", "palettize4": "palettized-4bit"}
PROMPT = "caption en"

PARITY_COLUMNS = ("dtype", "prefill max diff / range", "decode max diff / range", "prefill min cosine",
                  "decode min cosine", "greedy token agreement", "held-out exact match",
                  "change vs PyTorch (points)", "gate")
SIZE_COLUMNS = ("variant", *(f"{graph} (MB)" for graph in GRAPH_NAMES), "total (MB)", "x fp32")


def write_card(folder: Path, text: str) -> Path:
    """Write README.md as a new file (renamed into place): a README hard-linked from an input
    artifact (`quantize` links the files it keeps) is replaced, never written through."""
    path = Path(folder) / CARD
    temporary = path.with_name(f".{CARD}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


# ---- metadata ----

def checkpoint_of(source: dict) -> str:
    """The checkpoint a folder came from: an export's source, or a student's teacher."""
    return str(source.get("checkpoint") or source.get("teacher") or "")


def hub_id(source: dict) -> str | None:
    """The source's hub id: loaded from the hub (no local folder, so no sha256) and `owner/name`."""
    checkpoint = checkpoint_of(source)
    return checkpoint if source.get("sha256") is None and HUB_ID.fullmatch(checkpoint) else None


def is_demo(source: dict) -> bool:
    return is_demo_source(checkpoint_of(source))


def license_metadata(source: dict) -> dict:
    if is_demo(source):
        return {"license": PROJECT_LICENSE}
    return {"license": "gemma", "license_link": GEMMA_TERMS}


def license_text(source: dict) -> str:
    if is_demo(source):
        return ("The demo model was trained by pgexport on a synthetic task with its own tokenizer: no Gemma "
                "weights are in it. It is under pgexport's license, Apache-2.0.")
    return (f"PaliGemma's weights, and models derived from them such as this one, are subject to the "
            f"[Gemma Terms of Use]({GEMMA_TERMS}): by using them you agree to those terms.")


def license_note(source: dict) -> str:
    """The license in one plain line, for manifest.json and Core ML package metadata."""
    if is_demo(source):
        return "The pgexport demo model (no Gemma weights) is under pgexport's license, Apache-2.0."
    return f"Gemma weights are subject to the Gemma Terms of Use ({GEMMA_TERMS})."


def metadata(source: dict, *, library: str | None, tags: list[str], relation: str | None) -> dict:
    """The front matter's keys, in the order the Hub's own cards use. base_model only for a hub id
    (a local folder or the demo names no hub model); its relation only when it is not plain."""
    meta = license_metadata(source)
    base = hub_id(source)
    if base:
        meta["base_model"] = base
        if relation:
            meta["base_model_relation"] = relation
    meta["pipeline_tag"] = "image-text-to-text"
    if library:
        meta["library_name"] = library
    meta["tags"] = list(dict.fromkeys(["paligemma", *tags, "pgexport"]))
    return meta


def front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, default_flow_style=False) + "---\n"


def model_name(source: dict) -> str:
    if is_demo(source):
        return "pgexport demo PaliGemma"
    checkpoint = checkpoint_of(source)
    return checkpoint.rstrip("/").rsplit("/", 1)[-1] or "PaliGemma"


def source_section(fields: dict) -> str:
    source = fields.get("source") or {}
    checkpoint = checkpoint_of(source)
    # A local folder by its name only: the card is meant to be published, the path is this machine's
    # (manifest.json keeps it whole).
    where = (f"[`{checkpoint}`](https://huggingface.co/{checkpoint}) on the Hugging Face Hub" if hub_id(source)
             else "the demo model shipped inside pgexport" if is_demo(source)
             else f"local folder `{Path(checkpoint).name}` (no hub id, so no `base_model`)")
    sha = source.get("sha256")
    rows = [("checkpoint" if "checkpoint" in source else "teacher", where),
            ("sha256 of its weight files", f"`{sha}`" if sha else "none (a hub checkpoint: its revision pins it)")]
    if source.get("family"):
        rows.append(("family", source["family"]))
    if fields.get("quantized_from"):
        made = fields["quantized_from"]
        rows.append(("quantized from", f"`{Path(made['artifact']).name}` (its manifest.json's sha256 `{made['sha256_manifest']}`)"))
    rows.append(("made by", f"pgexport {fields.get('pgexport_version') or pgexport.__version__} (`{fields.get('format')}`)"))
    body = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"## Source\n\n| | |\n|---|---|\n{body}\n\n{license_text(source)}\n"


def table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- ONNX artifacts (export and quantize) ----

def onnx_precisions(fields: dict) -> list[str]:
    """Every graph precision in the folder: fp32 and those the variants use."""
    found = ["fp32", *(p for graphs in (fields.get("variants") or {}).values() for p in graphs.values())]
    return list(dict.fromkeys(found))


def parity_section(parity: dict | None) -> str:
    if not parity:
        return ("## Parity\n\nNot validated when written (`--no-validate`): `pgexport validate .` runs the gate "
                "against the PyTorch checkpoint.\n")
    rows = []
    for dtype, hop in parity["hops"].items():
        tokens, em = hop["tokens"], hop.get("exact_match")
        rows.append((
            dtype,
            f"{hop['prefill']['max_rel_diff']:.3e}",
            f"{hop['decode']['max_rel_diff']:.3e}",
            f"{hop['prefill']['min_cosine']:.6f}",
            f"{hop['decode']['min_cosine']:.6f}",
            f"{tokens['agreement']:.1%} ({'identical' if tokens['identical'] else 'differ'}; "
            f"{tokens['new_tokens']} tokens x {tokens['batch']} rows)",
            f"{em['artifact']:.1%} (PyTorch {em['reference']:.1%}, {em['rows']} rows)" if em else "-",
            f"{em['change_points']:+.2f}" if em else "-",
            "pass" if hop["passed"] else "FAIL: " + "; ".join(hop["failures"]),
        ))
    verdict = "every precision passed its gate" if parity["passed"] else "a gate FAILED"
    return (f"## Parity against the PyTorch model\n\nMeasured by pgexport's gate when this folder was written "
            f"({verdict}): logits at prefill and decode relative to their range, greedy tokens on a left-padded "
            f"batch, and held-out exact match where the model has an eval split.\n\n"
            f"{table(PARITY_COLUMNS, rows)}")


def size_section(sizes: dict | None) -> str:
    if not sizes:
        return "## Size\n\nfp32 graphs only; every file's size is in manifest.json.\n"
    rows = []
    for name, entry in sizes.items():
        precisions = entry.get("precisions", {})
        cells = [f"{entry['graphs'][graph] / 1e6:.3f}" + (f" ({precisions[graph]})" if precisions.get(graph, "fp32") != "fp32" else "")
                 for graph in GRAPH_NAMES]
        rows.append((name, *cells, f"{entry['total'] / 1e6:.3f}", f"{entry['ratio']:.4f}"))
    return f"## Size\n\nGraph files with their external data, per variant (1 MB = 10^6 bytes).\n\n{table(SIZE_COLUMNS, rows)}"


def js_dtype(fields: dict) -> tuple[str, dict]:
    """The variant the transformers.js snippet loads (the last whose graphs it is checked with) and
    its per-graph dtype map."""
    variants = fields.get("variants") or {}
    for name in reversed(fields.get("dtypes") or ["fp32"]):
        graphs = {graph: (variants.get(name) or {}).get(graph, "fp32") for graph in GRAPH_NAMES}
        if name in variants or name == "fp32":
            if set(graphs.values()) <= set(TRANSFORMERS_JS_CHECKED):
                return name, graphs
    return "fp32", dict.fromkeys(GRAPH_NAMES, "fp32")


def onnx_usage(fields: dict) -> str:
    dtypes = fields.get("dtypes") or ["fp32"]
    default = fields.get("default_dtype") or dtypes[-1]
    name, graphs = js_dtype(fields)
    dtype_map = ",\n".join(f"    {graph}: '{precision}'" for graph, precision in graphs.items())
    return f"""## Use it

### Python (pgexport)

```python
from PIL import Image
from pgexport import OnnxPaliGemma

model = OnnxPaliGemma("path/to/this/folder", dtype="{default}")  # one of: {", ".join(dtypes)}
print(model.generate([Image.open("image.png")], ["{PROMPT}"], max_new_tokens=32)[0].text)
```

```bash
pgexport verify path/to/this/folder    # every file against manifest.json (this card included)
pgexport generate path/to/this/folder --image image.png --prompt "{PROMPT}" --dtype {default} --check
```

### transformers.js

The folder is in transformers.js's layout (graphs under `onnx/`, the precision as a file suffix).
pgexport's tests run its {" and ".join(TRANSFORMERS_JS_CHECKED)} graphs in transformers.js 4.3.1;
this snippet loads the `{name}` variant.

```js
import {{ AutoProcessor, PaliGemmaForConditionalGeneration, RawImage }} from '@huggingface/transformers';

const model_id = 'your-name/this-repo';  // or a local folder: env.localModelPath = its parent, model_id = its name
const processor = await AutoProcessor.from_pretrained(model_id);
const model = await PaliGemmaForConditionalGeneration.from_pretrained(model_id, {{
  dtype: {{  // in a browser on WASM, embed_tokens 'fp32': onnxruntime-web runs the 8/4-bit table (GatherBlockQuantized) on WebGPU only
{dtype_map}
  }},
}});
const image = await RawImage.read('image.png');
const inputs = await processor(image, '<image>{PROMPT}');
const output = await model.generate({{ ...inputs, max_new_tokens: 32, do_sample: false }});
const answer = processor.batch_decode(output.slice(null, [inputs.input_ids.dims.at(-1), null]), {{ skip_special_tokens: true }});
console.log(answer[0]);
```

`{JS_FILE}` (here, no dependencies) parses a `detect` answer into boxes in the image's own pixels:
`parseDetections(answer[0], image.width, image.height)` -> `[{{ label, x0, y0, x1, y1, bins }}]`. In Python the
same boxes are `Generation.boxes`, and `pgexport generate ... --json --draw boxes.png` prints and draws them.
"""


def onnx_card(fields: dict) -> str:
    """The card of an ONNX artifact (`pgexport onnx` or `pgexport quantize`), from its manifest fields."""
    source = fields.get("source") or {}
    precisions = onnx_precisions(fields)
    meta = metadata(source, library="transformers.js", tags=["onnx", *precisions],
                    relation="quantized" if set(precisions) - {"fp32"} else None)
    dtypes = fields.get("dtypes") or ["fp32"]
    layout = "\n".join(f"- `onnx/{graph}*.onnx`" for graph in GRAPH_NAMES)
    intro = (f"# {model_name(source)}: ONNX ({', '.join(dtypes)})\n\n"
             f"{model_name(source)} ({source.get('family', 'PaliGemma')}) as ONNX Runtime graphs, exported by pgexport"
             f"{' and checked against the PyTorch model' if fields.get('parity') else ''}. Variants: {', '.join(dtypes)} (default "
             f"`{fields.get('default_dtype') or dtypes[-1]}`); graph precisions present: {', '.join(precisions)}.\n\n"
             f"{layout}\n\nplus config, generation config, tokenizer and processor files, and manifest.json (every "
             f"file's sha256 and size, the options, tool versions and the parity report).\n")
    return "\n".join([front_matter(meta), intro, source_section(fields), parity_section(fields.get("parity")),
                      size_section(fields.get("sizes")), onnx_usage(fields), seg_section(fields.get("seg_decoder"), "onnx"),
                      ort_section(fields.get("ort_format"))])


def seg_section(record: dict | None, kind: str) -> str:
    """The segmentation decoder (`--seg-decoder`): where it is, what it was made from, its parity."""
    if not record:
        return ""
    parity = record.get("parity") or record.get("wrapper_parity")
    checked = (f"checked against the PyTorch decoder on {parity['rows']} code rows: max |d| {parity['max_abs_diff']:.3g} "
               f"({parity['max_rel_diff']:.2g} of the largest logit), mask IoU {parity['mask_iou']:.6f}"
               if parity else "not checked (`--no-validate`)")
    where = "`onnx/seg_decoder.onnx` (int64 `codes` [batch, 16])" if kind == "onnx" else \
        "`seg_decoder.mlpackage` (int32 `codes` [1, 16], fp16 compute)"
    return f"""### Masks

A `segment` answer's 16 `<segNNN>` codes become a mask through {where}: 64 x 64 logits over
the answer's box, > 0 inside (resize them to the box in the image's pixels). Made from
`{record['source']}` (sha256 `{record['sha256'][:16]}...`, {record['codebook_size']} codes); {checked}.
`pgexport generate --json` returns the masks (COCO RLE) and `--draw` paints them.
"""


def ort_section(ort: dict | None) -> str:
    """The ORT-format graphs (`--ort-format`) for ONNX Runtime Mobile, from the manifest's record."""
    if not ort:
        return ""
    rows = [(f"`{name}`", f"{entry['onnx_bytes'] / 1e6:.3f}", f"{entry['ort_bytes'] / 1e6:.3f}")
            for name, entry in sorted(ort["graphs"].items())]
    return f"""### ONNX Runtime Mobile

Each graph is also here in ONNX Runtime's format (optimization style {ort['optimization_style']}, level
{ort['optimization_level']}, onnxruntime {ort['onnxruntime']}), with the operators they use in
`{ort['operators_config']}` for a reduced-operator build (`--minimal_build --include_ops_by_config`).

{table(("graph", ".onnx (MB)", ".ort (MB)"), rows)}

```bash
pgexport generate path/to/this/folder --image image.png --prompt "{PROMPT}" --graph-format ort
```
"""


# ---- Core ML folders ----

def coreml_parity_section(parity: dict) -> str:
    wrappers = (parity or {}).get("wrappers")
    runtime = (parity or {}).get("runtime")
    note = f"\n\nCore ML runtime: {runtime}.\n" if isinstance(runtime, str) else "\n"
    if not wrappers:
        return f"## Parity\n\nThe export wrappers were not checked (`--no-validate`).{note}"
    rows = [(row["prompt"], row["prompt_tokens"], f"{row['max_rel_diff']:.3e}",
             "identical" if row["tokens_identical"] else "differ") for row in wrappers["rows"]]
    verdict = "pass" if wrappers.get("passed") else "FAIL: " + "; ".join(wrappers.get("failures", []))
    return (f"## Parity\n\nThe export wrappers (what coremltools converts) against transformers, fp32 PyTorch, "
            f"{wrappers['new_tokens']} greedy tokens through the state-update loop: {verdict}.\n\n"
            f"{table(('prompt', 'prompt tokens', 'max diff / range', 'greedy tokens'), rows).rstrip()}{note}")


def coreml_size_section(packages: dict) -> str:
    rows = [(name, f"{entry['bytes'] / 1e6:.3f}", f"{entry['fp16_bytes'] / 1e6:.3f}", f"{entry['ratio']:.4f}")
            for name, entry in packages.items()]
    return f"## Size\n\n{table(('package', 'size (MB)', 'fp16 size (MB)', 'x fp16'), rows)}"


SWIFT_SECTION = f"""### Boxes

`{SWIFT_FILE}` (here, Foundation only) parses a `detect` answer into boxes in the frame's own pixels:
`parseDetections(tokenizer.decode(answer), width: frameWidth, height: frameHeight)` -> `[Detection]`
(label, x0, y0, x1, y1, bins), the same boxes as pgexport's Python and JavaScript parsers.
"""


def coreml_card(fields: dict, swift: str) -> str:
    """The card of a Core ML folder; `swift` is pgexport.coreml.package_readme's files table and
    Swift loop."""
    source, options = fields.get("source") or {}, fields.get("options") or {}
    compress = options.get("compress", "none")
    meta = metadata(source, library=None, tags=["coreml", "fp16", COREML_TAGS.get(compress, compress)],
                    relation="quantized" if compress != "none" else None)
    spec = fields.get("spec_check") or {}
    problems = spec.get("problems")
    checked = ("the saved specs match what was asked" if problems == [] else
               f"spec problems: {'; '.join(problems)}" if problems else "specs not checked")
    intro = (f"# {model_name(source)}: Core ML ({compress})\n\n"
             f"{model_name(source)} ({source.get('family', 'PaliGemma')}) as Core ML packages, converted by pgexport: "
             f"`{COREML_VISION.filename}` (camera frame in, SigLIP normalisation inside) and `{COREML_DECODER.filename}` "
             f"(KV cache held as Core ML state, {options.get('max_context')} tokens). Target {options.get('target')}, "
             f"weights {compress}; {checked}.\n")
    return "\n".join([front_matter(meta), intro, source_section(fields), coreml_parity_section(fields.get("parity")),
                      coreml_size_section(fields.get("packages") or {}),
                      seg_section(fields.get("seg_decoder"), "coreml"),
                      "Check every file (this card included): `pgexport verify .`; on macOS, "
                      "`pgexport validate .` runs the packages.\n", swift, SWIFT_SECTION])


# ---- distilled students ----

def student_card(fields: dict, report: dict) -> str:
    """The card of a `pgexport distill` student (a transformers PaliGemma checkpoint); figures from
    its report (report.json beside it)."""
    source = fields.get("source") or {}
    meta = metadata(source, library="transformers", tags=["distillation"], relation="finetune")
    teacher, student = report["teacher"], report["student"]
    rows = []
    for key, label, form in (("exact_match", "held-out exact match", "{:.1%}"), ("parameters", "parameters", "{:,}"),
                             ("decoder_layers", "decoder layers", "{}"), ("vision_layers", "vision layers", "{}"),
                             ("latency_ms", "CPU latency (ms)", "{:.1f}")):
        rows.append((label, *(form.format(side[key]) if isinstance(side.get(key), (int, float)) else str(side.get(key))
                              for side in (teacher, student))))
    intro = (f"# Distilled student of {model_name(source)}\n\nA PaliGemma checkpoint with fewer layers, initialised from "
             f"its teacher's and trained on the teacher's temperature-scaled outputs ({report['steps']} steps, "
             f"{report['eval_rows']} held-out rows). `pgexport onnx path/to/this/folder` exports it.\n")
    warning = f"\n**Warning:** {report['warning']}\n" if report.get("warning") else ""
    return "\n".join([front_matter(meta), intro, source_section(fields),
                      f"## Teacher and student\n\n{table(('', 'teacher', 'student'), rows)}{warning}",
                      "report.json and report.md hold the training history; manifest.json every file's sha256.\n"])


__all__ = ["CARD", "coreml_card", "onnx_card", "student_card", "write_card"]
