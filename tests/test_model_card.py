"""The model card (README.md) every folder pgexport writes: Hugging Face Hub front matter, parity and
size tables whose every figure is the manifest's, listed and hashed in manifest.json so that
`pgexport verify` covers it (issue 17, part 4).

Reads the session's demo artifact (conftest's `demo_onnx`); the Core ML card is checked on
test_coreml.py's conversion (check_coreml_card)."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml
from click.testing import CliRunner

from pgexport.card import CARD, onnx_card
from pgexport.cli import main
from pgexport.contract import GRAPH_NAMES
from pgexport.manifest import read_manifest, verify

HUB_KEYS = {"license", "pipeline_tag", "tags"}
NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.(\d+))?(?:e([+-]\d+))?(%?)")


def split_card(text: str) -> tuple[dict, str]:
    """(front matter parsed as YAML, body)."""
    assert text.startswith("---\n"), text[:80]
    head, separator, body = text[4:].partition("\n---\n")
    assert separator, "front matter not closed"
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta, body


def card_tables(body: str) -> dict[str, list[dict[str, str]]]:
    """Each `## ` section's markdown table rows as {column: cell}."""
    found, section, columns = {}, None, None
    for line in body.splitlines():
        if line.startswith("## "):
            section, columns = line[3:].strip(), None
        elif line.startswith("|") and section:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if columns is None:
                columns = cells
            elif not set(line) <= set("|-"):
                found.setdefault(section, []).append(dict(zip(columns, cells)))
        else:
            columns = None
    return found


def assert_figure(cell: str, value: float, scale: float = 1.0, nth: int = 0) -> None:
    """The `nth` number printed in `cell`, times `scale`, is `value` to the digits printed (a percent
    reads as a fraction)."""
    match = list(NUMBER.finditer(cell))[nth]
    digits, exponent, percent = match.groups()
    shown = float(match.group(0).rstrip("%").replace(",", ""))
    unit = 10.0 ** (-len(digits or "") + int(exponent or 0)) * (0.01 if percent else 1.0)
    shown *= 0.01 if percent else 1.0
    assert abs(shown * scale - value) <= 0.5 * unit * scale * (1 + 1e-9), (cell, value)


def check_listed_and_verified(folder) -> dict:
    """README.md is in manifest.json's files, and the folder verifies."""
    manifest = read_manifest(folder)
    assert CARD in manifest["files"]
    assert verify(folder) == []
    return manifest


def check_coreml_card(folder) -> None:
    """test_coreml.py calls this on its int4 conversion: front matter, the package size table
    against the manifest, the Swift loop kept, README.md listed and verified."""
    manifest = check_listed_and_verified(folder)
    meta, body = split_card((folder / CARD).read_text())
    assert HUB_KEYS <= set(meta) and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["license"] == "apache-2.0"  # the demo model
    assert {"coreml", "int4"} <= set(meta["tags"]) and "library_name" not in meta
    rows = card_tables(body)["Size"]
    assert [row["package"] for row in rows] == list(manifest["packages"])
    for row in rows:
        entry = manifest["packages"][row["package"]]
        assert_figure(row["size (MB)"], entry["bytes"], 1e6)
        assert_figure(row["fp16 size (MB)"], entry["fp16_bytes"], 1e6)
        assert_figure(row["x fp16"], entry["ratio"])
    wrappers = manifest["parity"]["wrappers"]
    for row, expected in zip(card_tables(body)["Parity"], wrappers["rows"], strict=True):
        assert row["prompt"] == expected["prompt"] and int(row["prompt tokens"]) == expected["prompt_tokens"]
        assert_figure(row["max diff / range"], expected["max_rel_diff"])
    assert "makeState()" in body and manifest["source"]["sha256"] in body


def check_parity_table(rows: list[dict], parity: dict) -> None:
    assert [row["dtype"] for row in rows] == list(parity["hops"])
    for row in rows:
        hop = parity["hops"][row["dtype"]]
        for stage in ("prefill", "decode"):
            assert_figure(row[f"{stage} max diff / range"], hop[stage]["max_rel_diff"])
            assert_figure(row[f"{stage} min cosine"], hop[stage]["min_cosine"])
        tokens = hop["tokens"]
        assert_figure(row["greedy token agreement"], tokens["agreement"])
        assert_figure(row["greedy token agreement"], tokens["new_tokens"], nth=1)
        assert_figure(row["greedy token agreement"], tokens["batch"], nth=2)
        assert ("identical" in row["greedy token agreement"]) == tokens["identical"]
        em = hop.get("exact_match")
        assert em, "the demo model has a held-out split"
        assert_figure(row["held-out exact match"], em["artifact"])
        assert_figure(row["held-out exact match"], em["reference"], nth=1)
        assert_figure(row["held-out exact match"], em["rows"], nth=2)
        assert_figure(row["change vs PyTorch (points)"], em["change_points"])
        assert row["gate"].startswith("pass" if hop["passed"] else "FAIL")


def check_size_table(rows: list[dict], sizes: dict, files: dict) -> None:
    assert [row["variant"] for row in rows] == list(sizes)
    for row in rows:
        entry = sizes[row["variant"]]
        for graph in GRAPH_NAMES:
            cell = row[f"{graph} (MB)"]
            assert_figure(cell, entry["graphs"][graph], 1e6)
            precision = entry.get("precisions", {}).get(graph, "fp32")
            assert cell.endswith(f"({precision})") if precision != "fp32" else "(" not in cell
            suffix = "" if precision == "fp32" else f"_{precision}"
            assert entry["graphs"][graph] == files[f"onnx/{graph}{suffix}.onnx"]["bytes"]  # the demo has no external data
        assert_figure(row["total (MB)"], entry["total"], 1e6)
        assert_figure(row["x fp32"], entry["ratio"])


def test_demo_artifact_card(demo_onnx):
    manifest = check_listed_and_verified(demo_onnx)
    text = (demo_onnx / CARD).read_text()
    meta, body = split_card(text)
    assert HUB_KEYS | {"library_name"} <= set(meta)
    # The demo model is the project's own (trained here, its own tokenizer): Apache-2.0, no hub base model.
    assert meta["license"] == "apache-2.0" and "license_link" not in meta and "base_model" not in meta
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["library_name"] == "transformers.js"
    assert {"onnx", "fp32", "int8"} <= set(meta["tags"])
    tables = card_tables(body)
    check_parity_table(tables["Parity against the PyTorch model"], manifest["parity"])
    check_size_table(tables["Size"], manifest["sizes"], manifest["files"])
    assert manifest["source"]["sha256"] in body and "OnnxPaliGemma" in body and "PaliGemmaForConditionalGeneration" in body
    assert "vision_encoder: 'int8'" in body and "embed_tokens: 'int8'" in body  # transformers.js's per-graph dtypes


def test_editing_the_card_fails_verify(demo_onnx, tmp_path):
    copy = shutil.copytree(demo_onnx, tmp_path / "artifact")
    card = copy / CARD
    data = bytearray(card.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte, same size
    card.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code == 4, result.output
    assert f"sha256 differs: {CARD}" in result.output


def test_gemma_checkpoints_get_the_gemma_terms(demo_onnx):
    """A hub checkpoint is the base model under the Gemma terms; a local folder names no base model."""
    fields = {key: value for key, value in read_manifest(demo_onnx).items() if key not in ("files", "versions")}
    hub = {**fields, "source": {"checkpoint": "google/paligemma2-3b-pt-224", "sha256": None, "family": "PaliGemma 2"}}
    meta, body = split_card(onnx_card(hub))
    assert meta["license"] == "gemma" and meta["license_link"] == "https://ai.google.dev/gemma/terms"
    assert meta["base_model"] == "google/paligemma2-3b-pt-224" and meta["base_model_relation"] == "quantized"
    assert "Gemma Terms of Use" in body
    local = {**fields, "source": {"checkpoint": "/models/my-paligemma", "sha256": "ab" * 32, "family": "PaliGemma 1"}}
    meta, _ = split_card(onnx_card(local))
    assert meta["license"] == "gemma" and "base_model" not in meta


def test_quantized_artifact_gets_its_own_card(demo_onnx, tmp_path):
    """quantize links the input's files into the output; the card is a new file, the input's is untouched
    (conftest's guard checks the input folder after the test)."""
    from pgexport.pipeline import quantize_artifact

    out = tmp_path / "q4"
    manifest = quantize_artifact(demo_onnx, out, methods=["q4"], validate=False, progress=False)
    assert (out / CARD).stat().st_ino != (demo_onnx / CARD).stat().st_ino
    assert check_listed_and_verified(out)["files"][CARD] == manifest["files"][CARD]
    assert verify(demo_onnx) == []
    meta, body = split_card((out / CARD).read_text())
    assert {"onnx", "fp32", "int8", "q4"} <= set(meta["tags"])
    check_size_table(card_tables(body)["Size"], manifest["sizes"], manifest["files"])
    assert "Not validated" in body and f"| quantized from | `{demo_onnx.name}` " in body  # --no-validate
    assert str(demo_onnx.parent) not in body  # a published card names local folders, not this machine's paths


@pytest.mark.slow
def test_student_checkpoint_card(checkpoint_factory, tmp_path):
    import json

    from pgexport.demo import EVAL_FILE
    from pgexport.distill.train import DistillConfig, distill

    rows = [json.loads(line) for line in EVAL_FILE.read_text().splitlines()[:12]]
    for row in rows:
        row["image"] = str(EVAL_FILE.parent / row["image"])
    for name, part in (("train.jsonl", rows[:8]), ("eval.jsonl", rows[8:])):
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in part))
    out = tmp_path / "student"
    report = distill(checkpoint_factory("tiny-pg1-mqa4"), out, DistillConfig(
        train=str(tmp_path / "train.jsonl"), eval_file=str(tmp_path / "eval.jsonl"), batch_size=4, decoder_layers=1,
        epochs=1, latency_runs=1), progress=False)
    check_listed_and_verified(out)
    meta, body = split_card((out / CARD).read_text())
    assert meta["library_name"] == "transformers" and meta["license"] == "gemma"  # a random "PaliGemma" teacher
    table = {row[""]: row for row in card_tables(body)["Teacher and student"]}
    for side in ("teacher", "student"):
        assert_figure(table["held-out exact match"][side], report[side]["exact_match"])
        assert_figure(table["parameters"][side], report[side]["parameters"])
        assert_figure(table["CPU latency (ms)"][side], report[side]["latency_ms"])
    assert int(table["decoder layers"]["student"]) == 1
