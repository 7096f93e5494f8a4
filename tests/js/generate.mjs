// Greedy generation with a pgexport artifact in transformers.js (Node, onnxruntime-node on CPU).
//
//   node generate.mjs ARTIFACT_DIR IMAGE_PATH PROMPT MAX_NEW_TOKENS [--dtype fp32|int8] [--stop-at-eos]
//
// Prints one JSON object:
//   {"tokens": [new token ids], "text": "...", "input_ids": [prompt ids], "auto_processor_class": "...", ...}
// The prompt is passed as "<image>" + PROMPT, as pgexport.runtime.prepare_inputs does. Without
// --stop-at-eos, eos is disabled so exactly MAX_NEW_TOKENS tokens come back.
// With --dtype int8, the graphs that have an `_int8` file load it (all three with `--int8`: the token
// table is GatherBlockQuantized, which onnxruntime-node runs), as pgexport's own runtime does.

import fs from 'node:fs';
import path from 'node:path';

import {
    AutoProcessor,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    RawImage,
    env,
} from '@huggingface/transformers';

function parseArgs(argv) {
    const positional = [];
    const options = { dtype: 'fp32', stopAtEos: false };
    for (let i = 0; i < argv.length; ++i) {
        if (argv[i] === '--dtype') options.dtype = argv[++i];
        else if (argv[i] === '--stop-at-eos') options.stopAtEos = true;
        else positional.push(argv[i]);
    }
    if (positional.length !== 4) {
        console.error('usage: node generate.mjs ARTIFACT_DIR IMAGE_PATH PROMPT MAX_NEW_TOKENS [--dtype fp32|int8] [--stop-at-eos]');
        process.exit(2);
    }
    const [artifact, image, prompt, maxNewTokens] = positional;
    return { artifact: path.resolve(artifact), image, prompt, maxNewTokens: Number(maxNewTokens), ...options };
}

// Per-graph dtype: a graph without a file of that precision falls back to fp32.
function dtypeMap(artifact, dtype) {
    const suffix = { fp32: '', int8: '_int8' }[dtype];
    if (suffix === undefined) throw new Error(`unsupported dtype ${dtype}`);
    const map = {};
    for (const graph of ['vision_encoder', 'embed_tokens', 'decoder_model_merged']) {
        map[graph] = fs.existsSync(path.join(artifact, 'onnx', `${graph}${suffix}.onnx`)) ? dtype : 'fp32';
    }
    return map;
}

const args = parseArgs(process.argv.slice(2));

// Local files only: the artifact folder is <localModelPath>/<name>.
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(args.artifact) + path.sep;
const name = path.basename(args.artifact);

// AutoProcessor picks PaliGemmaProcessor only when preprocessor_config.json names its
// processor_class; otherwise it returns a bare image Processor with no tokenizer. Record which
// one it gave, and fall back to the explicit class so generation can still be compared.
const autoProcessor = await AutoProcessor.from_pretrained(name);
const autoProcessorClass = autoProcessor.constructor.name;
const processor = autoProcessor instanceof PaliGemmaProcessor ? autoProcessor : await PaliGemmaProcessor.from_pretrained(name);

const dtype = dtypeMap(args.artifact, args.dtype);
const model = await PaliGemmaForConditionalGeneration.from_pretrained(name, { dtype, device: 'cpu' });

const image = await RawImage.read(args.image);
const inputs = await processor(image, '<image>' + args.prompt);

const generateOptions = { ...inputs, do_sample: false, max_new_tokens: args.maxNewTokens };
if (!args.stopAtEos) generateOptions.eos_token_id = null;
const sequences = await model.generate(generateOptions);

const promptLength = inputs.input_ids.dims.at(-1);
const tokens = sequences.tolist()[0].slice(promptLength).map(Number);
const text = processor.batch_decode([tokens], { skip_special_tokens: true })[0];

console.log(
    JSON.stringify({
        tokens,
        text,
        input_ids: inputs.input_ids.tolist()[0].map(Number),
        pixel_values_dims: inputs.pixel_values.dims,
        auto_processor_class: autoProcessorClass,
        model_class: model.constructor.name,
        dtype,
    }),
);
