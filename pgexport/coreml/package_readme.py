"""The Core ML part of the folder's README.md (the model card, pgexport.card, puts its front matter,
source, parity and sizes above it): what each file is and a Swift loop that drives the packages.
Package, input, output and state names come from the contract (pgexport.contract)."""

from __future__ import annotations

from pgexport.contract import (
    ATTENTION_MASK,
    COREML_DECODER,
    COREML_VISION,
    IMAGE,
    IMAGE_FEATURES,
    INPUT_IDS,
    KEY_CACHE,
    LOGITS,
    VALUE_CACHE,
)

TEMPLATE = """## Files

Compression: `{compress}`. Target: {target}.

| file | what |
|---|---|
| `{vision_file}` | `{image}` ({size}x{size} RGB image) -> `{features}` [1, {n_img}, hidden]{vision_size} |
| `{decoder_file}` | `{ids}` [1, q] int32, `{features}` [1, n, hidden], `{mask}` [1, 1, q, end] -> `{logits}` [1, 1, vocab]; states `{key_cache}`, `{value_cache}` {state}{decoder_size} |
| `prompt_layout.json` | special ids, prompt layout, mask convention, cache size |
| `tokenizer.json` ... | the tokenizer (Hugging Face `tokenizers` format; swift-transformers reads it) |
| `manifest.json` | every file's sha256 and size, options, parity and spec checks |

Prompt: `<image>` x {n_img}, `<bos>`, the prefix text, `\\n` (ids {image_id}, {bos_id}, ..., {newline_id}); stop at `<eos>` ({eos_id}).
The cache holds {max_context} tokens: prompt plus answer must fit.

## Swift

```swift
import CoreML
import Vision  // VNImageCropAndScaleOption

let config = MLModelConfiguration()
config.computeUnits = .cpuAndGPU
let vision = try MLModel(contentsOf: compiledURL("{vision}"), configuration: config)
let decoder = try MLModel(contentsOf: compiledURL("{decoder}"), configuration: config)

// 1. image -> features (Core ML resizes the frame to {size}x{size}; SigLIP normalisation is inside).
let constraint = vision.modelDescription.inputDescriptionsByName["{image}"]!.imageConstraint!
let frame = try MLFeatureValue(cgImage: cgImage, constraint: constraint, options: [.cropAndScale: VNImageCropAndScaleOption.scaleFill.rawValue])
let features = try vision.prediction(from: MLDictionaryFeatureProvider(dictionary: ["{image}": frame]))
    .featureValue(for: "{features}")!.multiArrayValue!

// 2. prefill: the whole prompt at once; a zero mask = bidirectional prefix (PaliGemma's prefix-LM).
let state = decoder.makeState()                      // the KV cache, updated in place by each call
var ids: [Int32] = promptIds                         // <image> x {n_img}, <bos>, tokenizer(prefix), "\\n"
func step(_ tokens: [Int32], _ image: MLMultiArray, end: Int) throws -> Int32 {{
    let q = tokens.count
    let inputIds = try MLMultiArray(shape: [1, NSNumber(value: q)], dataType: .int32)
    for (i, t) in tokens.enumerated() {{ inputIds[i] = NSNumber(value: t) }}
    let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: q), NSNumber(value: end)], dataType: .float16)
    memset(mask.dataPointer, 0, mask.count * 2)       // 0 = attend; -1e4 would block a key
    let out = try decoder.prediction(from: MLDictionaryFeatureProvider(dictionary: [
        "{ids}": inputIds, "{features}": image, "{mask}": mask]), using: state)
    let logits = out.featureValue(for: "{logits}")!.multiArrayValue!
    return Int32(argmax(logits))                     // greedy
}}
var end = ids.count
var next = try step(ids, features, end: end)

// 3. decode: one token per call; end = tokens in the cache after the call.
let oneRow = try MLMultiArray(shape: [1, 1, NSNumber(value: features.shape[2].intValue)], dataType: .float16)
var answer: [Int32] = []
while next != {eos_id} && end < {max_context} {{
    answer.append(next)
    end += 1
    next = try step([next], oneRow, end: end)
}}
print(tokenizer.decode(answer))
```

`compiledURL` compiles a package once (`MLModel.compileModel(at:)`) and caches the result; `argmax`
scans the fp16 logits. Reset the conversation with a new `makeState()`.
"""


def render(layout: dict, fields: dict, packages: dict) -> str:
    ids = layout["special_ids"]

    def size(package):
        entry = packages.get(package)
        return f" ({entry['bytes'] / 1e6:.1f} MB)" if entry else ""

    return TEMPLATE.format(
        compress=fields["options"]["compress"],
        target=fields["options"]["target"],
        size=layout["image_size"],
        n_img=layout["num_image_tokens"],
        state=layout["state_shape"],
        max_context=layout["max_context"],
        image_id=ids["image"], bos_id=ids["bos"], eos_id=ids["eos"], newline_id=ids["newline"],
        vision_size=size(COREML_VISION.name),
        decoder_size=size(COREML_DECODER.name),
        vision=COREML_VISION.name, decoder=COREML_DECODER.name,
        vision_file=COREML_VISION.filename, decoder_file=COREML_DECODER.filename,
        image=IMAGE, features=IMAGE_FEATURES, ids=INPUT_IDS, mask=ATTENTION_MASK, logits=LOGITS,
        key_cache=KEY_CACHE, value_cache=VALUE_CACHE,
    )
