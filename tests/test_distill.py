"""Distillation (issue 4) on tiny random-weight teachers: init from teacher layers, the loss against
a hand computation, resume, a 2-process (gloo) run against a 1-process run, bad input, and the
student through `pgexport onnx`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pgexport.cli import main
from pgexport.demo import EVAL_FILE
from pgexport.distill.loss import distill_loss
from pgexport.distill.student import every_kth, init_student, student_config, teacher_key
from pgexport.distill.train import DistillConfig, distill, ends_worse, lr_factor, work_folder
from pgexport.load import load_checkpoint

TEACHER = "tiny-pg1-mqa4"  # 3 decoder layers, 2 vision layers
# 4 micro-batch rows a step (batch x processes x accumulation), 2 steps an epoch, 2 epochs; hidden term on
SMALL = dict(epochs=2, lr=2e-3, temperature=2.0, alpha=0.5, hidden_weight=0.1, latency_runs=1)


def _split(folder: Path, name: str, rows: list[dict]) -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train.jsonl, eval.jsonl): 8 and 4 rows of the demo eval split, images by absolute path."""
    folder = tmp_path_factory.mktemp("distill-data")
    rows = [json.loads(line) for line in EVAL_FILE.read_text().splitlines()[:12]]
    for row in rows:
        row["image"] = str(EVAL_FILE.parent / row["image"])
    return _split(folder, "train.jsonl", rows[:8]), _split(folder, "eval.jsonl", rows[8:])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_init_copies_teacher_layers(checkpoint_factory):
    teacher = load_checkpoint(checkpoint_factory(TEACHER)).model
    student = init_student(teacher, decoder_map=[0, 2], vision_map=[1])
    assert student.config.text_config.num_hidden_layers == 2
    assert student.config.vision_config.num_hidden_layers == 1
    source = teacher.state_dict()
    maps = {"decoder": [0, 2], "vision": [1]}
    for key, value in student.state_dict().items():
        assert torch.equal(value, source[teacher_key(key, maps)]), key
    # student decoder layer 1 is teacher layer 2, its vision layer 0 is teacher layer 1
    assert teacher_key("model.language_model.layers.1.mlp.up_proj.weight", maps) == "model.language_model.layers.2.mlp.up_proj.weight"
    assert teacher_key("model.vision_tower.encoder.layers.0.fc1.weight", maps) == "model.vision_tower.encoder.layers.1.fc1.weight"
    assert every_kth(4, 2) == [0, 2] and every_kth(18, 6) == [0, 3, 6, 9, 12, 15]


def test_student_config_keeps_gemma2_layer_types(checkpoint_factory):
    teacher = load_checkpoint(checkpoint_factory("tiny-pg2")).config
    teacher.text_config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    config = student_config(teacher, decoder_map=[1, 2], vision_map=[0, 1])
    assert config.text_config.layer_types == ["full_attention", "sliding_attention"]
    assert teacher.text_config.num_hidden_layers == 3  # the teacher's config is untouched


def _hand_loss(student, teacher, labels, temperature, alpha):
    """KL and CE in plain Python over positions whose next token is a label."""
    kl = ce = 0.0
    tokens = 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            tokens += 1
            s, q = student[b, t].tolist(), teacher[b, t].tolist()
            ps = [math.exp(x / temperature) / sum(math.exp(y / temperature) for y in s) for x in s]
            pt = [math.exp(x / temperature) / sum(math.exp(y / temperature) for y in q) for x in q]
            kl += sum(p * math.log(p / r) for p, r in zip(pt, ps))
            ce -= math.log(math.exp(s[target]) / sum(math.exp(x) for x in s))
    kl, ce = kl / tokens, ce / tokens
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def test_loss_matches_hand_computation():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64) * 3
    labels = torch.tensor([[-100, -100, 3, 1, 6], [-100, -100, -100, 2, -100]])  # 3 + 1 suffix tokens
    for temperature, alpha in ((1.0, 0.5), (2.0, 0.7), (4.0, 1.0), (2.0, 0.0)):
        got = distill_loss(student, labels, teacher, temperature=temperature, alpha=alpha)
        expected, kl, ce = _hand_loss(student, teacher, labels, temperature, alpha)
        assert got["tokens"] == 4
        assert got["kl"].item() == pytest.approx(kl, rel=1e-6) and got["ce"].item() == pytest.approx(ce, rel=1e-6)
        assert got["loss"].item() == pytest.approx(expected, rel=1e-6)
    # T^2: with alpha 1 the loss is T^2 times the KL at that temperature
    only_kl = distill_loss(student, labels, teacher, temperature=3.0, alpha=1.0)
    assert only_kl["loss"].item() == pytest.approx(9.0 * only_kl["kl"].item(), rel=1e-6)
    # suffix only: logits at positions whose next token is not a label change nothing
    changed_student, changed_teacher = student.clone(), teacher.clone()
    for b, t in ((0, 0), (0, 4), (1, 0), (1, 1), (1, 3), (1, 4)):
        changed_student[b, t] += 100.0
        changed_teacher[b, t] -= 50.0
    again = distill_loss(changed_student, labels, changed_teacher, temperature=2.0, alpha=0.5)
    assert again["loss"].item() == pytest.approx(distill_loss(student, labels, teacher)["loss"].item(), rel=1e-7)
    # a suffix position does change it
    changed_student[1, 2, 0] += 1.0  # one logit (a shift of all of them would not change a softmax)
    assert distill_loss(changed_student, labels, teacher)["loss"].item() != pytest.approx(
        distill_loss(student, labels, teacher)["loss"].item(), rel=1e-6)
    # hidden-state term: mean squared difference over suffix positions, per pair
    hs, ht = torch.zeros(2, 5, 3, dtype=torch.float64), torch.zeros(2, 5, 3, dtype=torch.float64)
    hs[0, 2] = 2.0  # one suffix position off by 2 in every dim: 4 per token, over 4 tokens
    hs[1, 4] = 9.0  # not a suffix position
    term = distill_loss(student, labels, teacher, alpha=0.0, hidden_weight=0.5, hidden=[(hs, ht)])
    assert term["hidden"].item() == pytest.approx(1.0)
    assert term["loss"].item() == pytest.approx(term["ce"].item() + 0.5)


@pytest.fixture(scope="module")
def uninterrupted(checkpoint_factory, data, tmp_path_factory):
    """One process, batch 4: the reference run."""
    out = tmp_path_factory.mktemp("distill-run") / "student"
    report = distill(checkpoint_factory(TEACHER), out, DistillConfig(train=str(data[0]), eval_file=str(data[1]), batch_size=4, **SMALL),
                     progress=False)
    return out, report


def test_run_writes_student_and_report(uninterrupted, checkpoint_factory):
    out, report = uninterrupted
    assert report["steps"] == 4 and len(report["history"]) == 2
    assert report["student"]["decoder_layers"] == 1 and report["teacher"]["decoder_layers"] == 3
    assert report["student"]["parameters"] < report["teacher"]["parameters"]
    assert report["final_loss"]["hidden"] > 0 and report["final_loss"]["kl"] > 0
    assert (out / "report.md").read_text().startswith("# Distillation report")
    assert report["warning"] == ends_worse(report["student"]["exact_match_at_start"], report["student"]["exact_match"])
    assert ends_worse(0.5, 0.4).startswith("the student ends worse") and ends_worse(0.5, 0.5) is None
    assert not work_folder(out).exists()  # checkpoints are removed once the student is written
    student = load_checkpoint(out).model
    assert student.config.text_config.num_hidden_layers == 1
    # training moved the decoder away from the teacher's layer 0, and left the unused vision head alone
    teacher = load_checkpoint(checkpoint_factory(TEACHER)).model.state_dict()
    trained = student.state_dict()
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trained[key], teacher[key])
    assert torch.equal(trained["model.vision_tower.head.probe"], teacher["model.vision_tower.head.probe"])


def test_resume_ends_like_uninterrupted_run(uninterrupted, checkpoint_factory, data, tmp_path):
    out = tmp_path / "student"
    config = DistillConfig(train=str(data[0]), eval_file=str(data[1]), batch_size=4, **SMALL)
    stopped = distill(checkpoint_factory(TEACHER), out, config, stop_after=3, progress=False)
    assert stopped["stopped_at"] == 3 and not out.exists()
    assert (work_folder(out) / "progress.json").is_file()

    # the saved run is neither resumed with other options nor silently restarted
    cli = ["distill", str(checkpoint_factory(TEACHER)), "--train", str(data[0]), "--eval", str(data[1]), "-o", str(out),
           "--batch-size", "4"]
    result = CliRunner().invoke(main, cli + ["--resume"])
    assert result.exit_code == 4 and "different options" in result.output
    result = CliRunner().invoke(main, cli)
    assert result.exit_code == 5 and "--resume" in result.output

    report = distill(checkpoint_factory(TEACHER), out, config, resume=True, progress=False)
    reference_out, reference = uninterrupted
    assert report["final_loss"] == reference["final_loss"]
    assert report["history"] == reference["history"]
    expected = _weights(reference_out)
    for key, value in _weights(out).items():
        assert torch.equal(value, expected[key]), key


# How far 2 processes may end from 1 (test below), measured on this teacher and data, 4 steps. The same
# 16 rows' gradients are summed in another order (batch 4; batch 1 + accumulation + gloo all-reduce;
# matmul blocking follows the batch shape), so each gradient component differs by float32 rounding,
# <= 1.1e-6 of its tensor's largest. AdamW's step lr_t * m/(sqrt(v) + eps) hardly notices that for a
# component >> eps, but where the exact gradient is 0 the computed one is pure rounding noise G and the
# step is ~ lr_t * G / eps: noise amplified by lr/eps = 2e5. SigLIP's key biases are such weights (a
# constant added to every key leaves the softmax unchanged): they end 1.5e-5..2e-5 from 0 in every run
# and hold the worst difference (1.07e-5 on an AMD EPYC, 1.107e-5 on a Xeon with AMX, 0.47e-5..1.17e-5
# for 1 process with 1 thread, batch 2 x 2, batch 1 x 4, or gradients moved 1 ulp); the next worst,
# 1.0e-6, is an embedding entry whose first gradient was 1.4e-8 ~ eps. The key biases change no output,
# so their drift does not feed back: |difference| <= 2 * sum_t lr_t * G / eps, with G = C * u * S.
# Real bugs end far outside (worst 8e-3..1.2e-2 for a process without gradient sync, both processes on
# the same rows, one row dropped, or the loss normalised per process; 3.5e-4 for gradients doubled).
ADAM_EPS = 1e-8  # torch's AdamW default (train.py does not set it)
FP32_U = 2.0**-24  # float32 unit roundoff
KEY_GRAD_MASS = 7.7e-4  # S: largest sum of |dL/dkey| over rows and positions of one key channel in a step
NOISE_FACTOR = 2.0  # C: G / (u * S) measured at most 1.1 over the reference's and those 5 orders
# All other weights only see the rounding of each step's subtraction, 1 ulp (<= 2^-23 |w|) a step
# (measured: 1 ulp, 7.5e-9, at the 99th percentile; 1.7e-5 with gradients doubled, >= 2.7e-3 for the bugs).
BULK_SHARE = 0.99  # measured: 0.56% of the weights have a gradient within 10 eps of 0 at some step


@pytest.mark.slow
def test_two_processes_train_like_one(uninterrupted, checkpoint_factory, data, tmp_path):
    """torchrun, 2 CPU processes (gloo), batch 1 and 2 accumulated micro-batches each: the same 4 rows
    a step as the 1-process batch-4 run, so the same weights and losses."""
    out = tmp_path / "student"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "pgexport.distill", str(checkpoint_factory(TEACHER)), "--train", str(data[0]), "--eval", str(data[1]),
               "-o", str(out), "--batch-size", "1", "--grad-accum", "2", "--epochs", "2", "--lr", "2e-3",
               "--hidden-weight", "0.1", "--latency-runs", "1", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["processes"] == 2 and report["steps"] == 4
    reference_out, reference = uninterrupted
    for key in ("loss", "kl", "ce", "hidden"):
        assert report["final_loss"][key] == pytest.approx(reference["final_loss"][key], rel=1e-4, abs=1e-6)
    for got, want in zip(report["history"], reference["history"], strict=True):  # each epoch's losses, generated text
        assert got["exact_match"] == want["exact_match"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6)
    expected, weights = _weights(reference_out), _weights(out)
    differences = {key: (value - expected[key]).abs() for key, value in weights.items()}
    worst_key = max(differences, key=lambda key: differences[key].max().item())
    worst = differences[worst_key].max().item()
    lr_sum = sum(SMALL["lr"] * lr_factor(t, report["steps"], DistillConfig().warmup) for t in range(report["steps"]))
    bound = 2 * lr_sum * NOISE_FACTOR * FP32_U * KEY_GRAD_MASS / ADAM_EPS  # 2 * 6.1e-3 * 2 * 2^-24 * 7.7e-4 / 1e-8 = 1.1e-4
    assert worst < bound, f"{worst_key} differs by {worst:.3g}, more than reduction order explains ({bound:.3g})"
    # not sensitive to reduction order: all but the few near-zero-gradient weights agree to an ulp a step
    trainable = [key for key in weights if not key.startswith("vision_tower.head.")]  # the frozen head is equal
    bulk = torch.quantile(torch.cat([differences[key].flatten() for key in trainable]), BULK_SHARE).item()
    largest = max(expected[key].abs().max().item() for key in trainable)
    assert bulk <= report["steps"] * 2.0**-23 * largest, f"{BULK_SHARE:.0%} of the weights differ by up to {bulk:.3g}"
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    trained = load_checkpoint(reference_out).model.state_dict()[key]
    moved = (trained - load_checkpoint(checkpoint_factory(TEACHER)).model.state_dict()[key]).abs().max().item()
    assert moved > 100 * max(worst, 1e-7)  # the agreement is not just "nothing trained"


def _distill_cli(*args):
    return CliRunner().invoke(main, ["distill", *map(str, args)])


def test_bad_input_is_reported_before_training(checkpoint_factory, data, tmp_path):
    teacher = checkpoint_factory(TEACHER)
    out = tmp_path / "student"
    rows = data[0].read_text().splitlines()
    missing = json.loads(rows[1])
    missing["image"] = str(tmp_path / "nowhere.png")
    bad_train = _split(tmp_path, "bad.jsonl", [json.loads(rows[0]), missing])
    result = _distill_cli(teacher, "--train", bad_train, "--eval", data[1], "-o", out)
    assert result.exit_code == 4 and f"{bad_train}:2: image not found" in result.output

    result = _distill_cli(teacher, "--train", tmp_path / "missing.jsonl", "--eval", data[1], "-o", out)
    assert result.exit_code == 4 and "cannot read train file" in result.output
    result = _distill_cli(teacher, "--train", data[0], "--eval", tmp_path / "missing.jsonl", "-o", out)
    assert result.exit_code == 4 and "cannot read eval file" in result.output

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = _distill_cli(teacher, "--train", empty, "--eval", data[1], "-o", out)
    assert result.exit_code == 4 and "no rows" in result.output
    result = _distill_cli(teacher, "--train", data[0], "--eval", empty, "-o", out)
    assert result.exit_code == 4 and "no rows" in result.output

    result = _distill_cli(teacher, "--train", data[0], "--eval", data[1], "-o", out, "--decoder-layers", "4")
    assert result.exit_code == 4 and "larger than the teacher" in result.output
    result = _distill_cli(teacher, "--train", data[0], "--eval", data[1], "-o", out, "--vision-layers", "3")
    assert result.exit_code == 4 and "larger than the teacher" in result.output
    result = _distill_cli(teacher, "--train", data[0], "--eval", data[1], "-o", out, "--layer-map", "0,5")
    assert result.exit_code == 4 and "out of range" in result.output

    result = _distill_cli(teacher, "--train", data[0], "--eval", data[1], "-o", out, "--batch-size", "16")
    assert result.exit_code == 4 and "one optimizer step needs 16" in result.output

    not_paligemma = tmp_path / "gemma"
    not_paligemma.mkdir()
    (not_paligemma / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    (not_paligemma / "model.safetensors").write_bytes(b"")
    result = _distill_cli(not_paligemma, "--train", data[0], "--eval", data[1], "-o", out)
    assert result.exit_code == 3 and "not a PaliGemma checkpoint" in result.output

    result = _distill_cli(teacher, "--train", data[0], "-o", out)  # a non-demo teacher needs --eval
    assert result.exit_code == 4 and "--eval is required" in result.output
    assert not out.exists() and not work_folder(out).exists()


@pytest.mark.slow
def test_student_exports_through_the_gate(uninterrupted, tmp_path):
    from pgexport.pipeline import export_onnx

    out, _ = uninterrupted
    manifest = export_onnx(out, tmp_path / "onnx", int8=True, progress=False)  # raises if a gate fails
    assert manifest["parity"]["hops"]["fp32"]["tokens"]["identical"]
