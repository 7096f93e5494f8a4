"""Streaming dynamic int8 quantization against onnxruntime's own quantize_dynamic, and the graph
I/O every streaming quantizer shares (pgexport/graphio).

One small torch model (odd sizes, a 3-D [batch, seq, hidden] input, MatMuls with a run-time B
and a 2-D head that torch.onnx exports as Gemm) is exported once; every test quantizes it. The
streaming quantizers (int8, int4, the embedding table, static int8's streamed path in
test_quantize_static.py) are also run in chunks of a few rows and compared with one chunk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from pgexport.errors import BadInputError
from pgexport.graphio import read as graph_read
from pgexport.graphio import write as graph_write
from pgexport.quantize import int8 as q8
from pgexport.quantize.embed import quantize_embedding
from pgexport.quantize.int4 import quantize_int4
from pgexport.quantize.int8 import quantize_dynamic_int8

HIDDEN, WIDE, NARROW, CLASSES = 17, 73, 41, 5  # int8 weights above and below INLINE_LIMIT
MAX_REL_ERROR = 0.05  # int8 vs fp32, max |diff| / max |fp32|; measured ~0.01 on this model with VNNI
# onnxruntime's u8s8 MatMulInteger on x86 without VNNI (AVX2's vpmaddubsw) adds pairs of products in
# int16 with saturation (255 * 127 * 2 > 32767), so the int8 error there depends on the data: 0.066
# measured on an AMD EPYC with AVX2 only. The output bound is checked where the kernel is exact.
CPU_FLAGS = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
EXACT_INT8_DOT = bool(CPU_FLAGS & {"avx512_vnni", "avx_vnni", "amx_int8"}) or not CPU_FLAGS
QUANTIZED_NODES = 4  # up, mid, down (MatMul) and head (Gemm)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(HIDDEN, WIDE)
        self.mid = torch.nn.Linear(WIDE, NARROW, bias=False)
        self.down = torch.nn.Linear(NARROW, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):  # x: [batch, seq, HIDDEN]
        h = self.mid(torch.relu(self.up(x)))
        attention = torch.softmax(h @ h.transpose(1, 2), dim=-1)  # MatMuls with a run-time B
        y = self.down(attention @ h) + x
        return y, self.head(y.mean(dim=1))  # 2-D input: exported as Gemm(transB=1)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(path, feeds) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t, base_dir=str(path.parent)) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """(inline fp32 model, the same with all its weights in external data, feeds)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fp32")
    dims = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    with torch.no_grad():
        program = torch.onnx.export(
            Tiny().eval(), (torch.randn(2, 5, HIDDEN),), input_names=["x"], output_names=["y", "logits"],
            dynamic_shapes=(dims,), dynamo=True, verbose=False,
        )
    inline = folder / "tiny.onnx"
    program.save(str(inline))
    external = folder / "external" / "tiny.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(inline)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
              location="tiny.onnx.data", size_threshold=0)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 7, HIDDEN), dtype=np.float32)}
    return inline, external, feeds


@pytest.fixture(scope="module")
def reference(fp32, tmp_path_factory):
    """onnxruntime's quantize_dynamic output, per tensor and per channel."""
    inline, _, _ = fp32
    folder = tmp_path_factory.mktemp("ort")
    made = {}
    for per_channel in (False, True):
        made[per_channel] = folder / f"ref_{per_channel}.onnx"
        quantize_dynamic(str(inline), str(made[per_channel]), weight_type=QuantType.QInt8, per_channel=per_channel)
    return made


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_matches_onnxruntime_quantize_dynamic(fp32, reference, tmp_path, per_channel):
    inline, _, feeds = fp32
    dst = tmp_path / "tiny_int8.onnx"
    stats = quantize_dynamic_int8(inline, dst, per_channel=per_channel, progress=False)
    assert stats["quantized"] == QUANTIZED_NODES and stats["quantized_weights"] == QUANTIZED_NODES

    # same initializers, bit for bit (names, dtypes, shapes, values): weights, scales, zero points
    mine, theirs = initializers(dst), initializers(reference[per_channel])
    assert sorted(mine) == sorted(theirs)
    for name, value in mine.items():
        assert value.dtype == theirs[name].dtype and value.shape == theirs[name].shape, name
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    weights = {name[: -len("_quantized")]: v for name, v in mine.items() if v.dtype == np.int8 and v.ndim == 2}
    assert len(weights) == QUANTIZED_NODES
    floats = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(inline)).graph.initializer}
    for base, weight in weights.items():  # symmetric: zero points 0; per channel: one per output column
        scale = mine[base + "_scale"]
        assert scale.shape == ((weight.shape[1],) if per_channel else ())
        assert mine[base + "_zero_point"].shape == scale.shape
        assert not mine[base + "_zero_point"].any()
        # round to nearest: every weight within half a step of its float (plus float32 rounding)
        original = floats[base] if base in floats else floats[base.removesuffix("_Transposed")].T  # Gemm's transB
        assert np.all(np.abs(weight * scale - original) <= scale / 2 * (1 + 1e-6)), base

    # hence the same outputs (measured: max |diff| 0.0)
    ours, ort_int8 = run(dst, feeds), run(reference[per_channel], feeds)
    for a, b in zip(ours, ort_int8):
        assert np.abs(a - b).max() <= 1e-6


@pytest.mark.skipif(not EXACT_INT8_DOT, reason="onnxruntime's int8 kernel saturates on x86 without VNNI (see CPU_FLAGS)")
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_int8_outputs_stay_close_to_fp32(fp32, tmp_path, per_channel):
    inline, _, feeds = fp32
    dst = tmp_path / "tiny_int8.onnx"
    quantize_dynamic_int8(inline, dst, per_channel=per_channel, progress=False)
    for fp, ours in zip(run(inline, feeds), run(dst, feeds)):
        assert np.abs(ours - fp).max() / np.abs(fp).max() < MAX_REL_ERROR


def test_graph_has_quantized_ops_and_no_float_weight_matmul(fp32, tmp_path):
    inline, _, _ = fp32
    dst = tmp_path / "tiny_int8.onnx"
    stats = quantize_dynamic_int8(inline, dst, progress=False)
    model = onnx.load(str(dst))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulInteger") == QUANTIZED_NODES
    assert {"DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul"} <= set(ops)
    constants = {t.name for t in model.graph.initializer}
    assert not [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in constants]
    assert "Gemm" not in ops  # lowered to MatMulInteger (+ Add), as onnxruntime does
    # the two MatMuls of run-time activations stay float, and are reported
    assert ops.count("MatMul") == 2
    assert len(stats["skipped"]) == 2
    assert all("not a constant initializer" in s["reason"] for s in stats["skipped"])
    # interface unchanged
    source = onnx.load(str(inline))
    assert [(v.name, v.type) for v in model.graph.input] == [(v.name, v.type) for v in source.graph.input]
    assert [(v.name, v.type) for v in model.graph.output] == [(v.name, v.type) for v in source.graph.output]
    # the float weights the int8 ones replace are gone
    assert not {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}


def test_shared_and_odd_weights_match_onnxruntime(tmp_path):
    """A weight used by a MatMul, a Gemm(transB=1) and an Identity; an all-zero weight; a Constant;
    everything in external data. Same int8 initializers and MatMul outputs as onnxruntime's
    quantizer; the Identity keeps the fp32 weight (onnxruntime feeds it DequantizeLinear(int8))."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    shared = numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "shared")
    zeros = numpy_helper.from_array(np.zeros((HIDDEN, 3), np.float32), "zeros")
    nodes = [
        helper.make_node("MatMul", ["x", "shared"], ["h"], "mm"),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32))),
        helper.make_node("Add", ["h", "c"], ["y"], "add"),
        helper.make_node("Gemm", ["x2", "shared"], ["g"], "gemm", transB=1),
        helper.make_node("MatMul", ["g", "zeros"], ["z"], "mm_zero"),
        helper.make_node("Identity", ["shared"], ["w"], "keep"),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "odd", [helper.make_tensor_value_info("x", f32, ["b", "s", HIDDEN]), helper.make_tensor_value_info("x2", f32, ["b", HIDDEN])],
        [helper.make_tensor_value_info(n, f32, None) for n in ("y", "z", "w")], [shared, zeros],
    )
    src = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(src),
              save_as_external_data=True, location="odd.onnx.data", size_threshold=0)
    ref, dst = tmp_path / "ref.onnx", tmp_path / "mine.onnx"
    quantize_dynamic(str(src), str(ref), weight_type=QuantType.QInt8)
    stats = quantize_dynamic_int8(src, dst, external_data=True, progress=False)
    assert stats["quantized"] == 3 and stats["quantized_weights"] == 3  # shared, shared_Transposed, zeros

    mine, theirs = initializers(dst), initializers(ref)
    assert sorted(mine) == sorted([*theirs, "shared"])  # the Identity still needs it in float
    np.testing.assert_array_equal(mine.pop("shared"), numpy_helper.to_array(shared))
    for name, value in mine.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    assert mine["zeros_scale"] == 1.0  # onnxruntime's rule for an all-zero range
    feeds = {"x": rng.standard_normal((2, 3, HIDDEN)).astype(np.float32), "x2": rng.standard_normal((2, HIDDEN)).astype(np.float32)}
    (y, z, w), (ref_y, ref_z, _) = run(dst, feeds), run(ref, feeds)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(z, ref_z)
    np.testing.assert_array_equal(w, numpy_helper.to_array(shared))


def test_size_under_three_tenths(fp32, tmp_path):
    inline, _, _ = fp32
    dst = tmp_path / "tiny_int8.onnx"
    stats = quantize_dynamic_int8(inline, dst, progress=False)
    assert stats["weight_bytes_after"] < 0.3 * stats["weight_bytes_before"]
    assert stats["bytes_after"] < stats["bytes_before"] and stats["bytes_after"] == dst.stat().st_size
    # checked on the files themselves too
    fp_weights = sum(v.nbytes for v in initializers(inline).values() if v.ndim == 2)
    int8_weights = sum(v.nbytes for v in initializers(dst).values() if v.dtype == np.int8 and v.ndim == 2)
    assert int8_weights < 0.3 * fp_weights


def test_gemm_can_be_left_alone(fp32, tmp_path):
    inline, _, feeds = fp32
    dst = tmp_path / "tiny_int8.onnx"
    stats = quantize_dynamic_int8(inline, dst, op_types=("MatMul",), progress=False)
    assert stats["quantized"] == QUANTIZED_NODES - 1
    assert [s["reason"] for s in stats["skipped"] if s["op_type"] == "Gemm"] == ["Gemm is not in op_types"]
    assert [n.op_type for n in onnx.load(str(dst)).graph.node].count("Gemm") == 1
    run(dst, feeds)
    with pytest.raises(ValueError, match="op_types"):
        quantize_dynamic_int8(inline, dst, op_types=("Conv",), progress=False)


@pytest.mark.parametrize("source", ["inline", "external"])
def test_external_data_output(fp32, reference, tmp_path, source, monkeypatch, capsys):
    inline, external, feeds = fp32
    src = inline if source == "inline" else external
    dst = tmp_path / "out" / "tiny_int8.onnx"
    stats = quantize_dynamic_int8(src, dst, external_data=True, progress=True)
    assert "int8" in capsys.readouterr().err  # the progress bar
    data = dst.parent / "tiny_int8.onnx.data"
    assert stats["external_data"] == data.name and data.is_file()
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name, data.name]  # no temporary left
    assert stats["bytes_after"] == dst.stat().st_size + data.stat().st_size
    model = onnx.load(str(dst), load_external_data=False)
    stored = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert stored and all(graph_read.nbytes(t) >= graph_write.INLINE_LIMIT for t in stored)
    for t in stored:
        info = dict((e.key, e.value) for e in t.external_data)
        assert info["location"] == data.name and int(info["offset"]) % graph_write.SMALL_ALIGNMENT == 0
    assert all(graph_read.nbytes(t) < graph_write.INLINE_LIMIT for t in model.graph.initializer if t not in stored)
    # loads from anywhere, and runs exactly as the single-file output
    monkeypatch.chdir(tmp_path)
    single = tmp_path / "single.onnx"
    assert quantize_dynamic_int8(src, single, progress=False)["external_data"] is None  # tiny: one file
    for a, b in zip(run(dst, feeds), run(single, feeds)):
        np.testing.assert_array_equal(a, b)
    theirs = initializers(reference[False])
    for name, value in initializers(dst).items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)


def test_threshold_picks_external_data(fp32, tmp_path, monkeypatch):
    inline, _, feeds = fp32
    monkeypatch.setattr(graph_write, "EXTERNAL_DATA_THRESHOLD", 1000)
    dst = tmp_path / "tiny_int8.onnx"
    assert quantize_dynamic_int8(inline, dst, progress=False)["external_data"] == "tiny_int8.onnx.data"
    run(dst, feeds)
    # rerun over it, now as one file: the stale data file goes
    monkeypatch.setattr(graph_write, "EXTERNAL_DATA_THRESHOLD", 1 << 40)
    assert quantize_dynamic_int8(inline, dst, progress=False)["external_data"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name]
    run(dst, feeds)


def test_source_unchanged(fp32, reference, tmp_path, monkeypatch):
    _, external, feeds = fp32
    files = [external, external.parent / "tiny.onnx.data"]
    before = [sha256(f) for f in files]
    quantize_dynamic_int8(external, tmp_path / "a.onnx", progress=False)
    monkeypatch.setattr(graph_write, "INLINE_LIMIT", 64)  # per-channel scale vectors go external too
    quantize_dynamic_int8(external, tmp_path / "b.onnx", per_channel=True, external_data=True, progress=False)
    assert [sha256(f) for f in files] == before
    model = onnx.load(str(tmp_path / "b.onnx"), load_external_data=False)
    scales = [t for t in model.graph.initializer if t.name.endswith("_scale") and graph_read.nbytes(t) >= 64]
    assert scales and all(t.data_location == onnx.TensorProto.EXTERNAL for t in scales)
    for a, b in zip(run(tmp_path / "b.onnx", feeds), run(reference[True], feeds)):
        np.testing.assert_array_equal(a, b)


def test_already_quantized_is_refused(reference, tmp_path):
    src = reference[False]
    before = sha256(src)
    with pytest.raises(ValueError, match="already quantized") as error:
        quantize_dynamic_int8(src, tmp_path / "again.onnx", progress=False)
    assert isinstance(error.value, BadInputError)
    assert sha256(src) == before and not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\xff" * 10], ids=["empty", "garbage"])
def test_not_onnx_is_refused(tmp_path, content):
    src = tmp_path / "model.onnx"
    src.write_bytes(content)
    with pytest.raises(ValueError, match="not an ONNX model"):
        quantize_dynamic_int8(src, tmp_path / "out.onnx", progress=False)
    with pytest.raises(ValueError, match="no such file"):
        quantize_dynamic_int8(tmp_path / "missing.onnx", tmp_path / "out.onnx", progress=False)


def test_bad_destination_and_missing_data(fp32, tmp_path):
    inline, external, _ = fp32
    with pytest.raises(ValueError, match="destination is the source"):
        quantize_dynamic_int8(inline, inline, progress=False)
    # a graph whose external data file is gone fails before writing anything
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(external.read_bytes())
    with pytest.raises(ValueError, match="missing"):
        quantize_dynamic_int8(lonely, tmp_path / "out.onnx", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lonely.onnx"]


def test_crash_leaves_nothing_that_looks_complete(fp32, tmp_path, monkeypatch):
    inline, _, feeds = fp32
    dst = tmp_path / "tiny_int8.onnx"
    quantize_dynamic_int8(inline, dst, progress=False)
    previous = sha256(dst)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(q8, "_quantize", crash)
    with pytest.raises(OSError, match="disk full"):
        quantize_dynamic_int8(inline, dst, external_data=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name]  # no temporary, no half data file
    assert sha256(dst) == previous  # the earlier output is untouched
    run(dst, feeds)


# ---------------------------------------------------------------------------------------------
# chunked streaming: every streaming quantizer reads weights in row chunks of `chunk_bytes`; a
# chunk of a few rows must give the same file, byte for byte, as one chunk per weight.

V, H, F = 301, 48, 100  # table rows, hidden, MLP width: F rows of w2 cross int4's 32-row chunks unevenly


def _streaming_graph(folder: Path, external: bool) -> Path:
    """Gather(table) -> MatMul(w1) -> Relu -> MatMul(w2) -> ReduceMean -> Gemm(head, transB=1)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("table", (V, H)), ("w1", (H, F)), ("w2", (F, H)), ("head", (5, H)), ("bias", (5,)))]
    weights.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], "embed"),
             helper.make_node("MatMul", ["e", "w1"], ["h"], "mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], "mm2"),
             helper.make_node("ReduceMean", ["y", "axes"], ["m"], "mean", keepdims=0),
             helper.make_node("Gemm", ["m", "head", "bias"], ["logits"], "gemm", transB=1)]
    graph = helper.make_graph(nodes, "streaming", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], weights)
    path = folder / "g.onnx"
    folder.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path),
              save_as_external_data=external, location="g.onnx.data", size_threshold=0)
    return path


STREAMING = {  # name -> quantize(src, dst, chunk_bytes)
    "int8": lambda s, d, c: quantize_dynamic_int8(s, d, progress=False, chunk_bytes=c),
    "int8-per-channel": lambda s, d, c: quantize_dynamic_int8(s, d, per_channel=True, progress=False, chunk_bytes=c),
    "int4-rtn": lambda s, d, c: quantize_int4(s, d, block_size=16, progress=False, chunk_bytes=c),
    "int4-rtn-symmetric": lambda s, d, c: quantize_int4(s, d, block_size=16, symmetric=True, progress=False, chunk_bytes=c),
    "embed-4": lambda s, d, c: quantize_embedding(s, d, bits=4, block_size=16, progress=False, chunk_bytes=c),
    "embed-8": lambda s, d, c: quantize_embedding(s, d, bits=8, block_size=16, progress=False, chunk_bytes=c),
}


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
@pytest.mark.parametrize("method", sorted(STREAMING))
def test_chunked_streaming_is_bit_exact(tmp_path, monkeypatch, method, external):
    """Chunks of 3 rows (int4: its minimum of two 16-row blocks) across every weight, against one
    chunk per weight: the same bytes. The chunked run must really read several chunks a weight."""
    src = _streaming_graph(tmp_path / "src", external)
    blocks: list[int] = []
    rows = graph_read.Source.rows

    def counted(self, tensor, chunk_bytes):
        blocks.append(0)
        for r0, block in rows(self, tensor, chunk_bytes):
            blocks[-1] += 1
            yield r0, block

    monkeypatch.setattr(graph_read.Source, "rows", counted)
    quantize = STREAMING[method]
    quantize(src, tmp_path / "whole" / "q.onnx", 1 << 30)
    assert blocks and max(blocks) == 1
    blocks.clear()
    quantize(src, tmp_path / "chunked" / "q.onnx", 4 * 3 * H)
    assert min(blocks) >= 2, blocks  # every weight read in several chunks
    for folder in ("whole", "chunked"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["q.onnx"]
    assert sha256(tmp_path / "chunked" / "q.onnx") == sha256(tmp_path / "whole" / "q.onnx")
