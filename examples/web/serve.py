"""Serve the browser example and pgexport artifacts on localhost.

    python examples/web/serve.py OUT [OUT2 ...] [--port 8000] [--host 127.0.0.1]

then open http://127.0.0.1:8000/ . Routes:
  /                  this folder (index.html, main.js, node_modules/ from `npm ci`)
  /models/<name>/    the artifact folder OUT, where <name> is its folder name (or NAME with NAME=OUT)
  /models.json       the served model names, for the page's model list

Every response carries the cross-origin-isolation headers (COOP same-origin, COEP require-corp), so the
page gets SharedArrayBuffer and onnxruntime-web runs its WASM kernels on several threads; .js, .mjs
(module scripts, such as the artifact's paligemma_structured.js, which the page imports) and .wasm go
out with the MIME types browsers insist on, whatever the system's mimetypes tables say. Nothing is
cached (`Cache-Control: no-store`), so a re-exported artifact is what the next load reads. Standard
library only: tests/test_browser.py imports `make_server` from here and runs it in a thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent

MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".data": "application/octet-stream",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
}


def _handler(models: dict[str, Path], verbose: bool):
    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(WEB_DIR), **kwargs)

        def translate_path(self, path: str) -> str:
            """/models/<name>/rest -> the artifact's folder; anything else -> this folder. '.', '..'
            and empty segments are dropped, so no request reaches outside the served folders."""
            url_path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
            parts = [p for p in url_path.split("/") if p not in ("", ".", "..")]
            base = WEB_DIR
            if len(parts) >= 2 and parts[0] == "models" and parts[1] in models:
                base, parts = models[parts[1]], parts[2:]
            resolved = str(base.joinpath(*parts))
            return resolved + "/" if url_path.endswith("/") else resolved

        def do_GET(self):
            if urllib.parse.urlsplit(self.path).path == "/models.json":
                body = json.dumps(sorted(models)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def end_headers(self):
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.send_header("Cache-Control", "no-store")
            super().end_headers()

        def log_message(self, format, *args):
            if verbose:
                super().log_message(format, *args)

    return Handler


def make_server(models: dict[str, Path | str], host: str = "127.0.0.1", port: int = 0,
                verbose: bool = False) -> ThreadingHTTPServer:
    """A server (not yet serving) for this folder and `models` ({name: artifact folder}); port 0
    takes a free port (`server.server_address[1]`)."""
    folders = {name: Path(folder).resolve() for name, folder in models.items()}
    for name, folder in folders.items():
        if "/" in name or name in ("", ".", "..") or not folder.is_dir():
            raise ValueError(f"bad model {name}={folder}")
    server = ThreadingHTTPServer((host, port), _handler(folders, verbose))
    server.daemon_threads = True
    return server


def serve_in_thread(models: dict[str, Path | str], host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, str]:
    """Start serving on a free port in a daemon thread: (server, base URL). Stop with server.shutdown()."""
    server = make_server(models, host)
    threading.Thread(target=server.serve_forever, daemon=True, name="pgexport-web").start()
    return server, f"http://{host}:{server.server_address[1]}/"


def _parse_models(values: list[str]) -> dict[str, Path]:
    models = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = Path(value).resolve().name, value
        models[name] = Path(folder)
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", metavar="[NAME=]ARTIFACT", help="pgexport ONNX artifact folders to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if not (WEB_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        print(f"run `npm ci` in {WEB_DIR} first", file=sys.stderr)
        return 2
    try:
        server = make_server(_parse_models(args.models), args.host, args.port, args.verbose)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"serving {WEB_DIR} and {len(args.models)} model(s) on http://{args.host}:{server.server_address[1]}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
