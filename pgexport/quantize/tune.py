"""Accuracy-aware static int8: neural-compressor's tuning loop scored by the project's own metric.

    tune_static_int8(src, dst, feeds, evaluate, target) -> {"metric", "baseline", "fell_back", "trials", ...}

`evaluate(graph_path) -> float` scores an artifact whose graph is replaced by the candidate at
`graph_path` (higher is better: token agreement, demo exact match, logits cosine); `target` is
relative: 0.99 keeps 99% of the fp32 graph's score. neural-compressor 3.7.1's "basic" strategy
(strategy/basic.py) runs, stopping at the first candidate that meets the target:
  0. the fp32 graph, for the baseline;
  1. every MatMul/Gemm in int8: the graph quantize_static_int8 writes (the tuning space is
     that config's: min/max calibration only, so the op-type-wise stage adds no variant; the
     "apply all recipes" step scores the same graph again);
  2. each quantized node alone back in fp32, from the last node up, scoring each;
  3. nodes back in fp32 cumulatively, the most helpful first (by their stage-2 score).
At most `max_trials` candidates are scored. The best candidate is written at `dst`;
"fell_back" lists the MatMul/Gemm nodes it keeps in fp32 that the fully quantized graph
had in int8. No candidate meeting the target raises GateFailedError (exit 6) with the trial
history as its report, and nothing is written at `dst`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pgexport.errors import BadInputError, GateFailedError, UnsupportedError
from pgexport.graphio.read import graph_bytes
from pgexport.quantize import static
from pgexport.quantize.static import (
    CalibrationLoader,
    check_source,
    describe,
    neural_compressor_session,
    post_training_config,
    save,
    without_overridable_initializers,
    write,
)

DEFAULT_MAX_TRIALS = 100


def tune_static_int8(
    src: Path,
    dst: Path,
    feeds: list[dict],
    evaluate: Callable[[Path], float],
    target: float,
    *,
    progress: bool = True,
    max_trials: int = DEFAULT_MAX_TRIALS,
) -> dict:
    """Tune the static int8 quantization of `src` until `evaluate` keeps `target` x the fp32 score
    (see the module docstring). Returns {"metric": the written graph's score, "baseline": the fp32
    score, "target", "fell_back": node names, "trials":
    candidates scored (the baseline not counted), "history": [{"trial", "metric", "fp32_nodes"}],
    "quantized_nodes", "seconds"}."""
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not 0 < target <= 1:
        raise BadInputError(f"accuracy target {target}: give the share of the fp32 score to keep, in (0, 1]")
    if max_trials < 1:
        raise BadInputError(f"max_trials must be at least 1, got {max_trials}")
    graph = check_source(src, feeds)
    if graph_bytes(src) > static.STREAMED_THRESHOLD:
        raise UnsupportedError(f"{src.name}: accuracy-aware tuning runs neural-compressor's whole-graph loop, which "
                               "cannot hold a graph over 2 GiB (the 3B decoder); quantize it without "
                               "--accuracy-target (the streamed path) or tune the smaller graphs only")
    history = []
    with neural_compressor_session(dst.parent) as workspace:
        from neural_compressor import quantization
        from neural_compressor.config import AccuracyCriterion, TuningCriterion

        source, defaults = without_overridable_initializers(src, graph, workspace)

        def eval_func(model) -> float:
            # The strategy scores the fp32 graph first (strategy.py: _eval_baseline), then each candidate.
            if not history:
                path = src
            else:
                path = workspace / "candidate.onnx"
                write(model, path, defaults)
            metric = float(evaluate(path))
            history.append({"trial": len(history), "metric": metric, "fp32_nodes": describe(path)["fp32_nodes"]})
            return metric

        conf = post_training_config(
            graph,
            len(feeds),
            accuracy_criterion=AccuracyCriterion(higher_is_better=True, criterion="relative", tolerable_loss=1 - target),
            tuning_criterion=TuningCriterion(strategy="basic", max_trials=max_trials),
        )
        model = quantization.fit(str(source), conf, calib_dataloader=CalibrationLoader(feeds, defaults), eval_func=eval_func)
        report = {"baseline": history[0]["metric"] if history else None, "target": target,
                  "trials": len(history) - 1, "history": history}
        if model is None:
            best = max((h["metric"] for h in history[1:]), default=None)
            raise GateFailedError(
                f"accuracy target {target} not met in {report['trials']} trials: best {best} vs baseline {report['baseline']}",
                report=report,
            )
        save(model, dst, workspace, defaults)
    written = describe(dst)
    quantized_first = set(history[1]["fp32_nodes"]) if len(history) > 1 else set()
    return {
        **report,
        "metric": float(evaluate(dst)),
        "fell_back": [name for name in written["fp32_nodes"] if name not in quantized_first],
        "quantized_nodes": written["quantized_nodes"],
        "seconds": round(time.perf_counter() - started, 3),
    }

