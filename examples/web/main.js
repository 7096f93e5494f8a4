// pgexport in the browser: a pgexport ONNX artifact run by transformers.js 4.3.1 (onnxruntime-web, WASM).
//
// Served by serve.py: this folder at /, each artifact at /models/<name>/. Nothing is fetched from
// anywhere else: remote models are off, the WASM runtime comes from ./node_modules/onnxruntime-web.
//
// For scripts (tests/test_browser.py drives it in headless Chromium):
//   await window.pgexportGenerate({model, imageUrl, prompt, maxNewTokens, dtype, stopAtEos, device})
//     -> {tokens, text, input_ids, ms, first_token_ms, decode_ms_per_token, load_ms, dtype, ...}
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

// Per-graph dtype: a graph without a file of that precision stays fp32 (embed_tokens has no _int8
// file), as in pgexport's own runtime.
async function dtypeMap(model, dtype) {
    const suffix = SUFFIXES[dtype];
    if (suffix === undefined) throw new Error(`unsupported dtype ${dtype}: one of ${Object.keys(SUFFIXES).join(', ')}`);
    const map = {};
    for (const graph of GRAPHS) {
        map[graph] = suffix === '' || (await hasFile(model, `onnx/${graph}${suffix}.onnx`)) ? dtype : 'fp32';
    }
    return map;
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
    const dtypes = await dtypeMap(model, dtype);
    const [{ processor, autoProcessorClass }, { model: instance, load_ms }] = await Promise.all([
        getProcessor(model),
        getModel(model, dtypes, device),
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
    const text = processor.batch_decode([tokens], { skip_special_tokens: true })[0];
    const decodeSteps = stamps.length - 2;
    return {
        tokens,
        text,
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

// Issue 16 hook: once pgexport's runtime parses PaliGemma's <locYYYY> tokens into boxes, draw them
// here on the canvas laid over the preview (coordinates are in 1/1024ths of the image's size).
// Nothing is drawn yet: the canvas is only sized and cleared.
function drawBoxes(canvas, preview, _result) {
    canvas.width = preview.clientWidth;
    canvas.height = preview.clientHeight;
    canvas.getContext('2d').clearRect(0, 0, canvas.width, canvas.height);
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
        }
    });
    $('form').addEventListener('submit', async (event) => {
        event.preventDefault();
        const file = $('image').files[0];
        if (!file || !$('model').value) return;
        $('run').disabled = true;
        $('answer').textContent = '';
        $('tokens').textContent = '';
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
