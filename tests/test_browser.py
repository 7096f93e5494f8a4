"""The example page examples/web runs our artifact in a real browser: headless Chromium, transformers.js
4.3.1 on onnxruntime-web (WASM), all served from localhost. Its greedy tokens equal PyTorch's (fp32)
and pgexport's own ONNX Runtime result (int8, up to near-ties: assert_int8_like_ours); a `detect` answer keeps its <locNNNN> tokens and the
page's boxes (parsed by the artifact's own paligemma_structured.js) are pgexport.structured's; its
latency is printed, and recorded in benchmarks/results/browser.md with PGEXPORT_BROWSER_RECORD=1.

Needs Node.js, npm and Chromium. Chromium is looked up as `chromium` / `chromium-browser`; when absent
and we are root (or have passwordless sudo) Debian's package is installed with apt-get. The page's
npm packages (transformers.js, and puppeteer-core to drive the browser: it downloads no browser) are
installed into examples/web/node_modules with `npm ci --ignore-scripts`. examples/web/serve.py serves
the page and the artifact; examples/web/headless.mjs drives the browser.

`PGEXPORT_BROWSER_WEBGPU=1` also runs the demo on WebGPU (Chromium's SwiftShader adapter, a software
Vulkan on the CPU: slow) and records it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from pgexport.demo import CHECKPOINT_DIR, EVAL_FILE, load_split
from pgexport.structured import JS_FILE, parse_detections

# The other client's helpers and its sample inputs (the demo's --int8 artifact, images saved at the
# model's input size): both clients answer the same inputs. demo_js_artifact is a fixture.
from test_transformersjs import (  # noqa: F401
    assert_int8_like_ours,
    assert_same_generation,
    demo_js_artifact,
    model_sized_image,
    torch_greedy,
)

ROOT = Path(__file__).resolve().parent.parent
WEB_DIR = ROOT / "examples" / "web"
RESULTS = ROOT / "benchmarks" / "results" / "browser.md"
PINNED = {"@huggingface/transformers": "4.3.1", "puppeteer-core": "24.43.1"}
NEW_TOKENS = 12
LATENCY_TOKENS, LATENCY_RUNS = 32, 3
DETECT_TOKENS = 24  # eos on: a two-object answer is 12 tokens and eos
CHROMIUM_NAMES = ("chromium", "chromium-browser")
NODE, NPM = shutil.which("node"), shutil.which("npm")
COMMAND = "PGEXPORT_BROWSER_RECORD=1 .venv/bin/python -m pytest -q tests/test_browser.py"

pytestmark = [
    pytest.mark.node,
    pytest.mark.slow,
    pytest.mark.skipif(not (NODE and NPM), reason="the browser check needs Node.js and npm on PATH"),
]


# ---------------------------------------------------------------------------------------------
# Chromium, the page's npm packages, the server.


def _find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def _install_chromium() -> tuple[str | None, str]:
    """apt-get install Debian's chromium: (path or None, what happened, with the reason on failure)."""
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=10).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        return None, "Chromium is not on PATH (chromium, chromium-browser) and installing it needs root or passwordless sudo"
    if not shutil.which("apt-get"):
        return None, "Chromium is not on PATH (chromium, chromium-browser) and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    start = time.monotonic()
    for command, timeout in ((["apt-get", "update"], 300),
                             (["apt-get", "install", "-y", "--no-install-recommends", "chromium"], 900)):
        try:
            done = subprocess.run(prefix + command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return None, f"cannot install Chromium: `{' '.join(command)}` took over {timeout} s"
        if done.returncode != 0:
            return None, f"cannot install Chromium: `{' '.join(command)}` exited {done.returncode}: {done.stderr.strip()[-400:]}"
    path = _find_chromium()
    if not path:
        return None, "apt-get installed chromium but neither chromium nor chromium-browser is on PATH"
    seconds = time.monotonic() - start
    return path, f"installed by this test: `apt-get update && apt-get install -y --no-install-recommends chromium` ({seconds:.0f} s)"


@pytest.fixture(scope="session")
def chromium() -> dict:
    """{"path", "how"}: Chromium found on PATH, or installed from Debian's archive (else skip)."""
    path = _find_chromium()
    how = "found on PATH"
    if not path:
        path, how = _install_chromium()
        if not path:
            pytest.skip(how)
        print(f"\nChromium {how}")
    return {"path": path, "how": how}


def _installed(package: str) -> str | None:
    manifest = WEB_DIR / "node_modules" / package / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.is_file() else None


@pytest.fixture(scope="session")
def web_packages() -> None:
    """examples/web's pinned npm packages, installed once with `npm ci --ignore-scripts` (skipped
    when already there; onnxruntime-node's postinstall would download CUDA binaries)."""
    if any(_installed(name) != version for name, version in PINNED.items()):
        install = subprocess.run([NPM, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=WEB_DIR,
                                 capture_output=True, text=True, timeout=900)
        if install.returncode != 0:
            pytest.skip(f"npm ci in examples/web failed (npm registry unreachable?): {install.stderr.strip()[-500:]}")
    assert {name: _installed(name) for name in PINNED} == PINNED


def _serve_module():
    spec = importlib.util.spec_from_file_location("pgexport_web_serve", WEB_DIR / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_headless(spec: dict, folder: Path, timeout: float = 400) -> dict:
    """examples/web/headless.mjs on `spec` (written to folder/requests.json); its process group is
    killed on timeout, so no Chromium outlives it."""
    requests = folder / "requests.json"
    requests.write_text(json.dumps({"timeout_ms": int(timeout * 1000), **spec}))
    process = subprocess.Popen([NODE, "headless.mjs", str(requests)], cwd=WEB_DIR, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"headless Chromium took over {timeout} s:\n{stderr[-3000:]}")
    assert process.returncode == 0, f"headless.mjs failed:\n{stderr[-3000:]}"
    result = json.loads(stdout.strip().splitlines()[-1])
    result["console"] = stderr
    return result


def _request(image: Path, prompt: str, dtype: str, tokens: int, device: str = "wasm", stop_at_eos: bool = False) -> dict:
    return {"model": "demo", "image": str(image), "prompt": prompt, "maxNewTokens": tokens, "dtype": dtype,
            "stopAtEos": stop_at_eos, "device": device}


def _detect_rows() -> list:
    """Two `detect ...` rows of the eval split: the first with one object, the first with two."""
    rows = [row for row in load_split(EVAL_FILE) if row.prefix.startswith("detect ")]
    return [next(row for row in rows if row.suffix.count("<loc") == count) for count in (4, 8)]


def _content_type(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.headers["Content-Type"]


@pytest.fixture(scope="module")
def browser_run(chromium, web_packages, demo_js_artifact, tmp_path_factory) -> dict:
    """One headless Chromium session on the example page, serving the demo artifact as "demo": every
    sample at fp32 and int8 (NEW_TOKENS tokens, eos off), then LATENCY_RUNS timed runs of
    LATENCY_TOKENS tokens per dtype, then two `detect` rows (fp32, eos on) whose boxes the page parses
    with the artifact's paligemma_structured.js; and a second session with --enable-unsafe-webgpu, to see which
    WebGPU adapter Chromium offers then (and, with PGEXPORT_BROWSER_WEBGPU=1, to time two runs on it)."""
    _, artifact, samples = demo_js_artifact
    server, url = _serve_module().serve_in_thread({"demo": artifact})
    folder = tmp_path_factory.mktemp("browser")
    try:
        requests = [_request(image, prompt, dtype, NEW_TOKENS) for dtype in ("fp32", "int8") for image, prompt in samples]
        image, prompt = samples[0]
        requests += [_request(image, prompt, dtype, LATENCY_TOKENS) for dtype in ("fp32", "int8") for _ in range(LATENCY_RUNS)]
        detect = []
        for i, row in enumerate(_detect_rows()):
            with Image.open(row.image) as opened:
                detect.append((row, model_sized_image(opened, artifact, folder, f"detect{i}")))
        requests += [_request(path, row.prefix, "fp32", DETECT_TOKENS, stop_at_eos=True) for row, path in detect]
        content_types = {name: _content_type(url + name) for name in ("main.js", f"models/demo/{JS_FILE}")}
        webgpu_runs = os.environ.get("PGEXPORT_BROWSER_WEBGPU") == "1"
        load_before = os.getloadavg()[0]
        start = time.monotonic()
        run = run_headless({"url": url, "chromium": chromium["path"], "requests": requests}, folder)
        run["seconds"] = time.monotonic() - start
        run["load"] = (load_before, os.getloadavg()[0])
        gpu_requests = [_request(image, prompt, "fp32", LATENCY_TOKENS, "webgpu")] * 2 if webgpu_runs else []
        unsafe = run_headless({"url": url, "chromium": chromium["path"], "args": ["--enable-unsafe-webgpu"],
                               "requests": gpu_requests}, folder)
    finally:
        server.shutdown()
        server.server_close()
    errors = [r["error"] for r in run["results"] + unsafe["results"] if "error" in r]
    assert not errors, f"the page failed:\n{errors[0]}\n{run['console'][-3000:]}"
    count = len(samples)
    timed = 2 * count + 2 * LATENCY_RUNS
    return {
        **run,
        "fp32": run["results"][:count],
        "int8": run["results"][count : 2 * count],
        "latency": {"fp32": run["results"][2 * count : 2 * count + LATENCY_RUNS],
                    "int8": run["results"][2 * count + LATENCY_RUNS : timed]},
        "detect": [(row, path, result) for (row, path), result in zip(detect, run["results"][timed:], strict=True)],
        "content_types": content_types,
        "unsafe_webgpu": unsafe,
        "samples": samples,
        "chromium": chromium,
    }


# ---------------------------------------------------------------------------------------------
# The same tokens as the reference runtimes.


def test_browser_fp32_generates_like_pytorch(browser_run, demo_js_artifact):
    checkpoint, _, samples = demo_js_artifact
    assert browser_run["environment"]["transformers_version"] == PINNED["@huggingface/transformers"]
    for (image, prompt), result in zip(samples, browser_run["fp32"], strict=True):
        assert result["model_class"] == "PaliGemmaForConditionalGeneration"
        assert result["dtype"] == {"vision_encoder": "fp32", "embed_tokens": "fp32", "decoder_model_merged": "fp32"}
        assert result["device"] == "wasm"
        assert_same_generation(result, torch_greedy(checkpoint, image, prompt, NEW_TOKENS), f"browser fp32 {prompt!r}")


def test_browser_int8_generates_like_our_runtime(browser_run, demo_js_artifact):
    _, artifact, samples = demo_js_artifact
    for (image, prompt), result in zip(samples, browser_run["int8"], strict=True):
        assert result["dtype"] == {"vision_encoder": "int8", "embed_tokens": "fp32", "decoder_model_merged": "int8"}
        assert_int8_like_ours(result, artifact, image, prompt, f"browser int8 {prompt!r}")


def test_browser_timed_runs_repeat_the_same_tokens(browser_run):
    """The timed runs (LATENCY_TOKENS tokens, warm model) answer as the first run of that input."""
    for dtype, runs in browser_run["latency"].items():
        assert len(runs) == LATENCY_RUNS
        assert all(r["tokens"] == runs[0]["tokens"] for r in runs), dtype
        assert runs[0]["tokens"][:NEW_TOKENS] == browser_run[dtype][0]["tokens"], dtype
        assert len(runs[0]["tokens"]) == LATENCY_TOKENS


# ---------------------------------------------------------------------------------------------
# Boxes: the artifact's own parser (paligemma_structured.js), imported by the page.


def _boxes(boxes) -> list[tuple]:
    """(label, x0, y0, x1, y1, bins) of the page's boxes (dicts) or pgexport.structured's (Box)."""
    return [(b["label"], b["x0"], b["y0"], b["x1"], b["y1"], tuple(b["bins"])) if isinstance(b, dict)
            else (b.label, b.x0, b.y0, b.x1, b.y1, b.bins) for b in boxes]


def test_browser_serves_javascript_modules(browser_run):
    """Module scripts need a JavaScript MIME type: the page's own and the artifact's parser."""
    for name, content_type in browser_run["content_types"].items():
        assert content_type.startswith("text/javascript"), (name, content_type)


def test_browser_boxes_are_the_parsers(browser_run):
    """A detect answer keeps its <locNNNN> tokens, and the page's boxes (from the artifact's
    paligemma_structured.js, in the original image's pixels) are pgexport.structured's of the same
    text and image size, labelled with the kinds asked."""
    for row, image, result in browser_run["detect"]:
        with Image.open(image) as opened:
            width, height = opened.size
        assert result["parser_url"].endswith(f"/models/demo/{JS_FILE}"), result["boxes_note"]
        assert (result["image_width"], result["image_height"]) == (width, height)
        assert "<loc" in result["text"], f"{row.prefix!r}: the page's text lost the location tokens: {result['text']!r}"
        page = _boxes(result["boxes"])
        assert page == _boxes(parse_detections(result["text"], width, height)), row.prefix
        asked = row.prefix.removeprefix("detect ").split(" ; ")
        assert page and all(box[0] in asked for box in page), (row.prefix, result["text"])  # boxes of the kinds asked
    # Every other answer too: the same boxes as the Python parser ([] for one with no box).
    for result in browser_run["fp32"] + browser_run["int8"]:
        width, height = result["image_width"], result["image_height"]
        assert _boxes(result["boxes"]) == _boxes(parse_detections(result["text"], width, height)), result["text"]


# ---------------------------------------------------------------------------------------------
# Latency and WebGPU, recorded in benchmarks/results/browser.md.


def _cpu() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no lscpu)"
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    flags = set(fields.get("Flags", "").split())
    simd = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if flag in flags]
    where = f", {fields['Hypervisor vendor']} guest" if "Hypervisor vendor" in fields else ""
    return f"{fields.get('Model name', 'unknown')} (family {fields.get('CPU family')} model {fields.get('Model')}), " \
           f"{os.cpu_count()} CPUs{where}; {' '.join(simd) or 'no AVX2'}"


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _webgpu_lines(run: dict) -> list[str]:
    default, unsafe = run["environment"], run["unsafe_webgpu"]["environment"]

    def adapter(env: dict) -> str:
        if not env["webgpu"]:
            return "`navigator.gpu` is undefined"
        found = env["webgpu_adapter"]
        if not found:
            return "`navigator.gpu` exists but `requestAdapter()` returns null (no adapter)"
        return f"`requestAdapter()` gives an adapter: vendor {found['vendor']!r}, architecture {found['architecture']!r}"

    lines = [
        f"- headless Chromium with default flags: {adapter(default)}; transformers.js therefore runs on WASM.",
        f"- with `--enable-unsafe-webgpu`: {adapter(unsafe)}"
        + (" (SwiftShader: Vulkan emulated in software on the CPU, not a GPU)."
           if (unsafe["webgpu_adapter"] or {}).get("architecture") == "swiftshader" else "."),
    ]
    gpu_runs = run["unsafe_webgpu"]["results"]
    if gpu_runs:
        warm = gpu_runs[-1]
        same = warm["tokens"] == run["latency"]["fp32"][0]["tokens"]
        lines.append(
            f"- `device: 'webgpu'` on that adapter, fp32, {LATENCY_TOKENS} tokens, warm: {warm['ms']:.0f} ms "
            f"(first token {warm['first_token_ms']:.0f} ms, then {warm['decode_ms_per_token']:.1f} ms/token; "
            f"model load {warm['load_ms']:.0f} ms); tokens {'identical to' if same else 'DIFFERENT from'} the WASM run's."
        )
    else:
        lines.append("- `device: 'webgpu'` was not timed in this run (set `PGEXPORT_BROWSER_WEBGPU=1`; on SwiftShader it is"
                     " far slower than WASM). No hardware WebGPU adapter exists on this machine.")
    return lines


def test_browser_latency_is_recorded(browser_run, capsys, tmp_path):
    """Written to benchmarks/results/browser.md only when PGEXPORT_BROWSER_RECORD=1 (a test run leaves
    the checkout as it found it), else into the test's temporary folder; printed either way."""
    env = browser_run["environment"]
    rows = []
    for dtype, runs in browser_run["latency"].items():
        assert all(r["ms"] > 0 and r["first_token_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in runs)
        rows.append(f"| {dtype} | {LATENCY_TOKENS} | {_median(runs, 'ms'):.0f} | {_median(runs, 'first_token_ms'):.0f} | "
                    f"{_median(runs, 'decode_ms_per_token'):.1f} | {runs[0]['load_ms']:.0f} |")
    command = ("PGEXPORT_BROWSER_WEBGPU=1 " if browser_run["unsafe_webgpu"]["results"] else "") + COMMAND
    ort_web = json.loads((WEB_DIR / "node_modules" / "onnxruntime-web" / "package.json").read_text())["version"]
    vision = json.loads((CHECKPOINT_DIR / "config.json").read_text())["vision_config"]
    size, image_tokens = vision["image_size"], (vision["image_size"] // vision["patch_size"]) ** 2
    prompt_tokens = len(browser_run["fp32"][0]["input_ids"])  # the timed input is the first sample
    text = "\n".join([
        "# In-browser latency (examples/web, WASM)",
        "",
        f"Written by `{command}` (tests/test_browser.py) on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"- CPU: {_cpu()}",
        f"- browser: headless {browser_run['browser_version']} ({browser_run['chromium']['path']}, {browser_run['chromium']['how']})",
        f"- transformers.js {env['transformers_version']}, onnxruntime-web {ort_web}, WASM backend, "
        f"{env['threads']} thread(s), cross-origin isolated: {env['cross_origin_isolated']}",
        f"- model: the demo model (`pgexport onnx --int8`), {size}x{size} image, {prompt_tokens} prompt tokens "
        f"({image_tokens} image tokens), eos off; median of {LATENCY_RUNS} warm runs on one input",
        f"- 1-minute load average {browser_run['load'][0]:.1f} before and {browser_run['load'][1]:.1f} after the browser "
        f"session, on {os.cpu_count()} CPUs (above the CPU count, other processes shared the cores and the times are inflated)",
        "",
        "| dtype | new tokens | generate (ms) | first token (ms): vision + prefill | decode (ms/token) | model load (ms, first use) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "int8 is vision_encoder_int8 + decoder_model_merged_int8 with embed_tokens fp32 (as pgexport's runtime loads it).",
        f"The same session's {len(browser_run['samples'])} inputs x 2 dtypes gave the tokens of PyTorch (fp32) and of "
        "pgexport's ONNX Runtime (int8, up to near-ties: assert_int8_like_ours), compared by the test.",
        "",
        "## WebGPU",
        "",
        *_webgpu_lines(browser_run),
        "",
    ])
    results = RESULTS if os.environ.get("PGEXPORT_BROWSER_RECORD") == "1" else tmp_path / RESULTS.name
    results.write_text(text)
    with capsys.disabled():
        print(f"\n{results}:\n" + "\n".join(rows)
              + f"\n(headless session {browser_run['seconds']:.1f} s, load average {browser_run['load'][0]:.1f})")
