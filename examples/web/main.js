// pgexport in the browser: a pgexport ONNX artifact run by transformers.js 4.3.1 (onnxruntime-web, WASM).
//
// Served by serve.py: this folder at /, each artifact at /models/<name>/. Nothing is fetched from
// anywhere else: remote models are off, the WASM runtime comes from ./node_modules/onnxruntime-web.
//
// For scripts (tests/test_browser.py drives it in headless Chromium):
//   await window.pgexportGenerate({model, imageUrl, prompt, maxNewTokens, dtype, stopAtEos, device})
//     -> {tokens, text, boxes, image_width, image_height, input_ids, ms, first_token_ms,
//         decode_ms_per_token, load_ms, dtype, ...}
//   `text` keeps the <locNNNN> / <segNNN> tokens; `boxes` is the artifact's own parser
//   (/models/<name>/paligemma_structured.js, parseDetections) on it: [{label, x0, y0, x1, y1, bins,
//   score}] in the original image's pixels ([] for an answer with no box), or null when the artifact
//   has no parser (`boxes_note` says why).
//   await window.pgexportEnvironment() -> {webgpu, webgpu_adapter, cross_origin_isolated, threads, ...}
//   window.pgexportReady is true once this module has loaded.
//
// Limits: graphs whose weights live in external data files (pgexport writes them above 2 GiB, as
// <graph>.onnx.data) are not loaded here, and a 3B model does not fit the 4 GiB of WASM memory anyway;
// the demo model and small exports are what this page is for.

import {
    AutoProcessor,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    RawImage,
    env,
} from '@huggingface/transformers';

const GRAPHS = ['vision_encoder', 'embed_tokens', 'decoder_model_merged'];
// pgexport's file suffixes, which are transformers.js's dtype suffixes too.
const SUFFIXES = { fp32: '', fp16: '_fp16', int8: '_int8', q4: '_q4' };
// Graphs whose file of that precision onnxruntime-web's WASM backend cannot run: the 8- and 4-bit
// token tables are a GatherBlockQuantized (com.microsoft) node, which only its WebGPU (JSEP) kernels
// implement. On WASM that graph loads its fp32 file, which every artifact has.
const WASM_UNSUPPORTED = { embed_tokens: new Set(['int8', 'q4']) };
// The artifact's own detection parser (pgexport copies it into every ONNX artifact).
const PARSER_FILE = 'paligemma_structured.js';
// Tokens an answer keeps even where a tokenizer marks them special (as pgexport's decode_answer does).
const ANSWER_TOKEN = /^<(?:loc[0-9]{4}|seg[0-9]{3})>$/;

// Local files only, from this server.
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = '/models/';
env.useBrowserCache = false; // a re-exported artifact under the same name must not come from a stale cache
env.backends.onnx.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;
// onnxruntime-web uses threads only when the page is cross-origin isolated (serve.py sends the
// headers); its default is ceil(cores / 2), capped at 4. `?threads=N` overrides it.
const threadsParam = Number(new URLSearchParams(location.search).get('threads'));
if (threadsParam > 0) env.backends.onnx.wasm.numThreads = threadsParam;
else if (globalThis.crossOriginIsolated) env.backends.onnx.wasm.numThreads = Math.min(4, navigator.hardwareConcurrency || 1);

const loaded = new Map(); // `${model}|${device}|${dtype map}` -> Promise<{model, load_ms}>
const processors = new Map(); // model -> Promise<{processor, autoProcessorClass}>

const manifests = new Map(); // model -> Promise<Set of file paths | null>

// The artifact's files, from its manifest.json (pgexport lists every file it wrote); null without one.
function artifactFiles(model) {
    if (!manifests.has(model)) {
        manifests.set(model, fetch(`${env.localModelPath}${model}/manifest.json`)
            .then((response) => (response.ok ? response.json() : null))
            .then((manifest) => (manifest?.files ? new Set(Object.keys(manifest.files)) : null))
            .catch(() => null));
    }
    return manifests.get(model);
}

async function hasFile(model, file) {
    const files = await artifactFiles(model);
    if (files) return files.has(file);
    const response = await fetch(`${env.localModelPath}${model}/${file}`, { method: 'HEAD' }).catch(() => null);
    return Boolean(response?.ok);
}

// Per-graph dtype: a graph without a file of that precision stays fp32 (older --int8 artifacts have
// no embed_tokens_int8), as in pgexport's own runtime; so does one WASM cannot run (WASM_UNSUPPORTED).
async function dtypeMap(model, dtype, device = 'wasm') {
    const suffix = SUFFIXES[dtype];
    if (suffix === undefined) throw new Error(`unsupported dtype ${dtype}: one of ${Object.keys(SUFFIXES).join(', ')}`);
    const map = {};
    for (const graph of GRAPHS) {
        const runnable = device !== 'wasm' || !WASM_UNSUPPORTED[graph]?.has(dtype);
        map[graph] = suffix === '' || (runnable && (await hasFile(model, `onnx/${graph}${suffix}.onnx`))) ? dtype : 'fp32';
    }
    return map;
}

const parsers = new Map(); // model -> Promise<{parseDetections} | {note}>

// The artifact's paligemma_structured.js as a module, imported once per model; {note} when the
// artifact has none (an export older than the parser) or it does not load.
function getParser(model) {
    if (!parsers.has(model)) {
        const url = new URL(`${env.localModelPath}${model}/${PARSER_FILE}`, location.href).href;
        parsers.set(model, (async () => {
            if (!(await hasFile(model, PARSER_FILE))) return { note: `${model} has no ${PARSER_FILE}: boxes not parsed` };
            try {
                const { parseDetections } = await import(url);
                if (typeof parseDetections !== 'function') return { note: `${url} exports no parseDetections: boxes not parsed` };
                return { parseDetections, url };
            } catch (error) {
                return { note: `cannot import ${url}: ${error}` };
            }
        })());
    }
    return parsers.get(model);
}

// An answer's text: special tokens (eos, pad, ...) left out, <locNNNN> and <segNNN> kept even where a
// tokenizer marks them special. (In the demo's tokenizer, as in transformers' PaliGemmaProcessor,
// they are plain added tokens, and transformers.js's skip_special_tokens keeps them too.)
function decodeAnswer(tokenizer, tokens) {
    const dropped = new Set(tokenizer.all_special_ids
        .filter((_, i) => !ANSWER_TOKEN.test(tokenizer.all_special_tokens[i])));
    const kept = tokens.filter((id) => !dropped.has(id));
    return kept.length ? tokenizer.decode(kept, { skip_special_tokens: false }) : '';
}

// AutoProcessor returns PaliGemmaProcessor only when preprocessor_config.json names its
// processor_class; otherwise fall back to the explicit class (as tests/js/generate.mjs does).
function getProcessor(model) {
    if (!processors.has(model)) {
        processors.set(model, (async () => {
            const auto = await AutoProcessor.from_pretrained(model);
            const processor = auto instanceof PaliGemmaProcessor ? auto : await PaliGemmaProcessor.from_pretrained(model);
            return { processor, autoProcessorClass: auto.constructor.name };
        })());
    }
    return processors.get(model);
}

function getModel(model, dtype, device) {
    const key = `${model}|${device}|${JSON.stringify(dtype)}`;
    if (!loaded.has(key)) {
        loaded.set(key, (async () => {
            const start = performance.now();
            const instance = await PaliGemmaForConditionalGeneration.from_pretrained(model, { dtype, device });
            return { model: instance, load_ms: performance.now() - start };
        })());
        loaded.get(key).catch(() => loaded.delete(key));
    }
    return loaded.get(key);
}

async function readImage(image) {
    if (image instanceof RawImage) return image;
    if (image instanceof Blob) return RawImage.fromBlob(image);
    return RawImage.read(image); // a URL: http(s), blob: or data:
}

/**
 * Greedy generation for one (image, prompt), prompted as pgexport does: "<image>" + prompt.
 * With stopAtEos false, eos is disabled and exactly maxNewTokens tokens come back.
 */
export async function pgexportGenerate({
    model,
    imageUrl,
    prompt,
    maxNewTokens = 32,
    dtype = 'fp32',
    stopAtEos = true,
    device = 'wasm',
    onToken = null,
}) {
    if (!model) throw new Error('no model given');
    const dtypes = await dtypeMap(model, dtype, device);
    const [{ processor, autoProcessorClass }, { model: instance, load_ms }, parser] = await Promise.all([
        getProcessor(model),
        getModel(model, dtypes, device),
        getParser(model),
    ]);
    const image = await readImage(imageUrl);
    const inputs = await processor(image, '<image>' + prompt);

    // A streamer receives the prompt before the first forward pass, then each new token.
    const stamps = [];
    const streamer = {
        put(value) {
            stamps.push(performance.now());
            if (stamps.length > 1 && onToken) onToken(Number(value[0][0]));
        },
        end() {},
    };
    const options = { ...inputs, do_sample: false, max_new_tokens: maxNewTokens, streamer };
    if (!stopAtEos) options.eos_token_id = null;
    const start = performance.now();
    const sequences = await instance.generate(options);
    const ms = performance.now() - start;

    const promptLength = inputs.input_ids.dims.at(-1);
    const tokens = sequences.tolist()[0].slice(promptLength).map(Number);
    const text = decodeAnswer(processor.tokenizer, tokens);
    // In the original image's pixels: the processor resizes the whole image to the model's square.
    const boxes = parser.parseDetections ? parser.parseDetections(text, image.width, image.height) : null;
    const decodeSteps = stamps.length - 2;
    return {
        tokens,
        text,
        boxes,
        boxes_note: parser.note ?? null,
        parser_url: parser.url ?? null,
        image_width: image.width,
        image_height: image.height,
        input_ids: inputs.input_ids.tolist()[0].map(Number),
        ms,
        first_token_ms: stamps.length > 1 ? stamps[1] - start : null, // image encoding + prefill
        decode_ms_per_token: decodeSteps > 0 ? (stamps.at(-1) - stamps[1]) / decodeSteps : null,
        load_ms,
        dtype: dtypes,
        device,
        threads: env.backends.onnx.wasm.numThreads,
        cross_origin_isolated: globalThis.crossOriginIsolated,
        model_class: instance.constructor.name,
        auto_processor_class: autoProcessorClass,
        transformers_version: env.version,
    };
}

/** What this browser offers: WebGPU (navigator.gpu and an adapter), threads, isolation. */
export async function pgexportEnvironment() {
    let adapter = null;
    let adapterError = null;
    if ('gpu' in navigator) {
        try {
            const found = await navigator.gpu.requestAdapter();
            if (found) {
                const info = found.info ?? {};
                adapter = { vendor: info.vendor, architecture: info.architecture, device: info.device, description: info.description };
            }
        } catch (error) {
            adapterError = String(error);
        }
    }
    return {
        webgpu: 'gpu' in navigator,
        webgpu_adapter: adapter,
        webgpu_error: adapterError,
        cross_origin_isolated: globalThis.crossOriginIsolated,
        hardware_concurrency: navigator.hardwareConcurrency,
        threads: env.backends.onnx.wasm.numThreads,
        user_agent: navigator.userAgent,
        transformers_version: env.version,
    };
}

// Outline colours, in turn (pgexport.structured's PALETTE).
const PALETTE = ['rgb(255,0,255)', 'rgb(0,255,255)', 'rgb(255,140,0)', 'rgb(0,255,0)', 'rgb(255,255,255)', 'rgb(0,0,0)'];
const DARK_INK = new Set([0, 1, 2, 4]); // black labels on these colours, white on the others (as pgexport draws)

// The result's boxes (original image pixels) on the canvas laid over the preview, scaled to the size
// the preview is displayed at; each with its label above it (inside it at the top edge). The canvas
// is cleared first, and left clear for a result without boxes. Returns how many were drawn.
function drawBoxes(canvas, preview, result) {
    const scale = window.devicePixelRatio || 1;
    const width = preview.clientWidth;
    const height = preview.clientHeight;
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    canvas.width = Math.round(width * scale);
    canvas.height = Math.round(height * scale);
    const context = canvas.getContext('2d');
    context.setTransform(scale, 0, 0, scale, 0, 0);
    context.clearRect(0, 0, width, height);
    const boxes = result?.boxes ?? [];
    if (!boxes.length || !(result.image_width > 0 && result.image_height > 0) || !width || !height) return 0;
    const sx = width / result.image_width;
    const sy = height / result.image_height;
    context.lineWidth = 2;
    context.font = '12px system-ui, sans-serif';
    context.textBaseline = 'top';
    boxes.forEach((box, index) => {
        const color = PALETTE[index % PALETTE.length];
        const [x0, y0, x1, y1] = [box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy];
        context.strokeStyle = color;
        context.strokeRect(x0 + 1, y0 + 1, Math.max(x1 - x0 - 2, 1), Math.max(y1 - y0 - 2, 1));
        if (box.label) {
            const labelWidth = Math.ceil(context.measureText(box.label).width) + 4;
            const labelHeight = 15;
            const x = Math.max(0, Math.min(x0, width - labelWidth));
            const y = y0 >= labelHeight ? y0 - labelHeight : y0; // above the box when there is room
            context.fillStyle = color;
            context.fillRect(x, y, labelWidth, labelHeight);
            context.fillStyle = DARK_INK.has(index % PALETTE.length) ? '#000' : '#fff';
            context.fillText(box.label, x + 2, y + 1);
        }
    });
    return boxes.length;
}

function describeBoxes(result) {
    if (result.boxes === null) return `${result.boxes_note} (nothing drawn)`;
    if (!result.boxes.length) return 'no boxes in the answer';
    const lines = result.boxes.map((box) => `${box.label || '(no label)'}: x ${box.x0.toFixed(1)}..${box.x1.toFixed(1)}, ` +
        `y ${box.y0.toFixed(1)}..${box.y1.toFixed(1)}`);
    return [`${lines.length} box(es), in pixels of the ${result.image_width}x${result.image_height} image:`, ...lines].join('\n');
}

// ---------------------------------------------------------------------------------------------
// The form.

const $ = (id) => document.getElementById(id);

async function listModels() {
    const names = await (await fetch('/models.json')).json();
    $('model').replaceChildren(...names.map((name) => new Option(name, name)));
    return names;
}

function wireForm() {
    $('image').addEventListener('change', () => {
        const file = $('image').files[0];
        if (file) {
            $('preview').src = URL.createObjectURL(file);
            $('preview').style.display = 'block';
            drawBoxes($('boxes'), $('preview'), null); // the previous image's boxes are not this one's
            $('boxes-note').textContent = '';
        }
    });
    $('form').addEventListener('submit', async (event) => {
        event.preventDefault();
        const file = $('image').files[0];
        if (!file || !$('model').value) return;
        $('run').disabled = true;
        $('answer').textContent = '';
        $('tokens').textContent = '';
        $('boxes-note').textContent = '';
        drawBoxes($('boxes'), $('preview'), null);
        $('status').textContent = 'loading the model and generating…';
        const streamed = [];
        try {
            const result = await pgexportGenerate({
                model: $('model').value,
                imageUrl: file,
                prompt: $('prompt').value,
                maxNewTokens: Number($('max-new-tokens').value),
                dtype: $('dtype').value,
                onToken: (id) => {
                    streamed.push(id);
                    $('tokens').textContent = streamed.join(' ');
                },
            });
            $('answer').textContent = result.text;
            $('tokens').textContent = result.tokens.join(' ');
            $('timing').textContent =
                `load ${result.load_ms.toFixed(0)} ms (first run only)\n` +
                `generate ${result.ms.toFixed(0)} ms for ${result.tokens.length} tokens: ` +
                `first token ${result.first_token_ms?.toFixed(0)} ms, then ${result.decode_ms_per_token?.toFixed(1) ?? '-'} ms/token\n` +
                `dtype ${JSON.stringify(result.dtype)}, ${result.device}, ${result.threads} thread(s)`;
            drawBoxes($('boxes'), $('preview'), result);
            $('boxes-note').textContent = describeBoxes(result);
            $('status').textContent = 'done';
        } catch (error) {
            $('status').textContent = `failed: ${error}`;
            console.error(error);
        } finally {
            $('run').disabled = false;
        }
    });
}

window.pgexportGenerate = pgexportGenerate;
window.pgexportEnvironment = pgexportEnvironment;
if ($('form')) {
    wireForm();
    listModels()
        .then((names) => ($('status').textContent = names.length ? 'ready' : 'no model served: pass an artifact folder to serve.py'))
        .catch((error) => ($('status').textContent = `cannot list models: ${error}`));
}
window.pgexportReady = true;
