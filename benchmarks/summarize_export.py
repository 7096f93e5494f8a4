"""Markdown summary of an artifact manifest: sizes per graph and precision, and the parity figures."""

import argparse
import json
from collections import defaultdict


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest")
    parser.add_argument("--label", required=True)
    args = parser.parse_args()
    manifest = json.load(open(args.manifest))
    sizes = defaultdict(int)
    for name, entry in manifest["files"].items():
        if name.startswith("onnx/"):
            graph = name.split("/")[1].split(".onnx")[0]
            sizes[graph] += entry["bytes"]
    print(f"\n### {args.label} ({manifest['versions'].get('onnxruntime')} ort, export {manifest.get('export_seconds')} s)\n")
    print("| graph | bytes | GB |\n|---|---|---|")
    for graph, total in sorted(sizes.items()):
        print(f"| {graph} | {total} | {total / 1e9:.2f} |")
    fp32 = sum(v for k, v in sizes.items() if not k.endswith("_int8"))
    int8 = sum(sizes[k + "_int8"] if k + "_int8" in sizes else v for k, v in sizes.items() if not k.endswith("_int8"))
    print(f"\nfp32 package {fp32 / 1e9:.2f} GB; int8 package (int8 vision + decoder, fp32 embed_tokens) {int8 / 1e9:.2f} GB = {int8 / fp32:.3f}x\n")
    parity = manifest.get("parity") or {"hops": {}}
    print("| dtype | prefill max|d|/range | decode max|d|/range | min cosine | greedy tokens | gate |\n|---|---|---|---|---|---|")
    for dtype, hop in parity["hops"].items():
        cosine = min(hop["prefill"]["min_cosine"], hop["decode"]["min_cosine"])
        tokens = hop["tokens"]
        print(f"| {dtype} | {hop['prefill']['max_rel_diff']:.2e} | {hop['decode']['max_rel_diff']:.2e} | {cosine:.6f} | "
              f"{tokens['agreement']:.0%} of {tokens['new_tokens']} x {tokens['batch']} | {'pass' if hop['passed'] else 'FAIL'} |")


if __name__ == "__main__":
    main()
