"""Size and speed of a model: parameters, multiply-accumulates, measured latency with its spread.

>>> import torch
>>> from torch import nn
>>> count_macs(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 10, 10))
13824
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_prune.core.modules import evaluating
from lightning_prune.core.trace.records import call_model


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def _attention_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """Flops of one scaled-dot-product attention (``q @ k^T`` and ``attention @ v``), from the shapes."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict[Any, Any]:
    """Formulas ``FlopCounterMode`` lacks: the CPU kernel of ``scaled_dot_product_attention``."""
    aten = torch.ops.aten
    return {
        getattr(aten, name): _attention_flops
        for name in ("_scaled_dot_product_flash_attention_for_cpu",)
        if hasattr(aten, name)
    }


@contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Route ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` through their plain ops for the block.

    In eval mode without grad both take a fused kernel (``_native_multi_head_attention``) that
    ``FlopCounterMode`` cannot see into: the projections and the attention matmuls would go uncounted.
    The plain path computes the same products, so counting it counts what the fused kernel does.
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@torch.no_grad()
def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one eval-mode forward pass on ``example_input``, from torch's ``FlopCounterMode``.

    MACs are half the flops that ``torch.utils.flop_counter.FlopCounterMode`` counts: convolutions
    (transposed, grouped and depthwise too), linear layers and every matrix product (``mm``, ``bmm``,
    ``addmm``, ``baddbmm``, ``matmul``, ``einsum``), and attention, whether written out or through
    ``scaled_dot_product_attention`` or ``nn.MultiheadAttention`` (its fused eval-mode fast path is
    switched off for the count, so the projections and ``q @ k^T``, ``attention @ v`` are seen).
    Elementwise ops, norms and pooling are not counted. The model is run in eval mode under
    ``no_grad`` and its training mode restored.

    >>> import torch
    >>> from torch import nn
    >>> count_macs(nn.Linear(16, 4), torch.randn(2, 16))
    128
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    with evaluating(model), _mha_fastpath_disabled(), counter:
        call_model(model, example_input)
    return int(counter.get_total_flops()) // 2


@dataclass(frozen=True)
class Latency:
    """Latency of one model's forward pass: median and interquartile range over ``samples`` timings.

    >>> Latency(median_ms=2.0, q1_ms=1.5, q3_ms=2.75, samples=25).spread_ms
    1.25
    """

    median_ms: float
    q1_ms: float  # 25th percentile
    q3_ms: float  # 75th percentile
    samples: int

    @property
    def spread_ms(self) -> float:
        """The interquartile range, ``q3_ms - q1_ms``: how much the machine's noise moves a timing."""
        return self.q3_ms - self.q1_ms

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        """Summarise timings given in seconds.

        >>> Latency.of([0.001, 0.002, 0.003, 0.004, 0.005])
        Latency(median_ms=3.0, q1_ms=2.0, q3_ms=4.0, samples=5)
        """
        if not seconds:
            raise ValueError("Latency.of needs at least one timing.")
        ms = [s * 1e3 for s in seconds]
        if len(ms) == 1:
            return cls(ms[0], ms[0], ms[0], 1)
        q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        return cls(median_ms=median, q1_ms=q1, q3_ms=q3, samples=len(ms))


def latency_is_noise(a: Latency, b: Latency) -> bool:
    """True when the two interquartile ranges overlap: the difference is within the machine's noise.

    >>> latency_is_noise(Latency(10.0, 9.0, 11.0, 25), Latency(10.5, 10.8, 12.0, 25))
    True
    >>> latency_is_noise(Latency(10.0, 9.0, 11.0, 25), Latency(5.0, 4.5, 5.5, 25))
    False
    """
    return a.q1_ms <= b.q3_ms and b.q1_ms <= a.q3_ms


_MIN_SAMPLES = 5
_clock = time.perf_counter  # the wall clock for CPU timings and the budget (tests replace it)


class _Timer:
    """Times one call: CUDA events when the input is on a GPU, the wall clock otherwise."""

    def __init__(self, example_input: Any) -> None:
        leaves = [t for t in torch.utils._pytree.tree_leaves(example_input) if isinstance(t, torch.Tensor)]
        self.cuda = next((t.device for t in leaves if t.is_cuda), None)

    def __call__(self, model: nn.Module, example_input: Any) -> float:
        """Seconds one forward pass takes."""
        if self.cuda is None:
            start = _clock()
            call_model(model, example_input)
            return _clock() - start
        with torch.cuda.device(self.cuda):  # events on the input's device, not the current one
            torch.cuda.synchronize()  # earlier work does not count against this call
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            call_model(model, example_input)
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1e3


@torch.no_grad()
def compare_latency(
    models: Mapping[str, nn.Module],
    example_input: Any,
    *,
    rounds: int = 5,
    repeats: int = 5,
    warmup: int = 2,
    budget_s: float = 3.0,
) -> dict[str, Latency]:
    """Time several models fairly: interleaved rounds, median and interquartile range per model.

    Each round times every model ``repeats`` times, the model order alternating per round; eval
    mode, ``no_grad``, CUDA synchronised (CUDA events when the input is on a GPU). The budget caps
    the total time: fewer repeats for slow models, but at least 5 samples each. Every submodule is
    restored to the training mode it had. Interleaving spreads the machine's drifting load (other processes, clock boost, thermal state)
    over every model alike, so two models are compared under the same conditions. Each model is
    first called ``warmup`` times (untimed; at least once, which also estimates its cost). The
    repeats per round are then cut for models whose ``rounds * repeats`` calls would not fit their
    share of ``budget_s``, down to ``ceil(5 / rounds)`` per round; rounds stop early once the budget
    is spent and every model has 5 samples.

    >>> import torch
    >>> from torch import nn
    >>> times = compare_latency({"dense": nn.Linear(64, 64), "small": nn.Linear(64, 8)}, torch.randn(4, 64))
    >>> sorted(times), times["dense"].samples
    (['dense', 'small'], 25)
    """
    if not models:
        return {}
    if rounds < 1 or repeats < 1 or warmup < 0 or not budget_s > 0:
        raise ValueError(
            f"compare_latency needs rounds >= 1, repeats >= 1, warmup >= 0 and budget_s > 0; got {rounds}, {repeats}, {warmup}, {budget_s}."
        )
    names = list(models)
    timer = _Timer(example_input)
    started = _clock()
    with evaluating(*models.values()):
        cost = {}
        for name in names:  # warm-up, and a first estimate of each model's cost
            cost[name] = min(timer(models[name], example_input) for _ in range(max(warmup, 1)))
        share = max(budget_s - (_clock() - started), 0.0) / len(names)
        least = math.ceil(_MIN_SAMPLES / rounds)
        per_round = {name: max(least, min(repeats, _fitting(share, rounds * cost[name]))) for name in names}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                samples[name].extend(timer(models[name], example_input) for _ in range(per_round[name]))
            spent = _clock() - started > budget_s
            if spent and all(len(s) >= _MIN_SAMPLES for s in samples.values()):
                break
    return {name: Latency.of(samples[name]) for name in names}


def _fitting(seconds: float, cost: float) -> int:
    """How many calls of ``cost`` seconds fit in ``seconds`` (as many as wanted when either is unbounded)."""
    if cost <= 0 or math.isinf(seconds):
        return 2**31
    return int(seconds / cost)


def measure_latency(model: nn.Module, example_input: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of one eval-mode forward pass (synchronising CUDA when the input is on a GPU).

    ``max(repeats, 5)`` timings, no time budget; :func:`compare_latency` times several models
    fairly and gives the spread.
    """
    latency = compare_latency(
        {"model": model}, example_input, rounds=1, repeats=max(repeats, _MIN_SAMPLES), warmup=warmup, budget_s=math.inf
    )
    return latency["model"].median_ms / 1e3


def compare_models(
    dense: nn.Module, exported: nn.Module, inputs: Mapping[str, Any], *, measure_latency: bool = True
) -> dict[str, Any]:
    """Size and speed of a model before and after export, side by side.

    ``inputs`` names the example inputs to time on (``{"b1": one_image, "b64": a_batch}``): for each,
    the two models are timed interleaved (:func:`compare_latency`) and the report gives medians,
    interquartile ranges, whether the difference is within the noise, and ``latency_<name>_per_mac``:
    the latency ratio (exported / dense) divided by the MAC ratio, 1.0 when latency falls as fast as
    the MACs do. Params and MACs are counted once, on the first input. ``measure_latency=False``
    leaves the timings out (a sharded model's forward is collective, so it cannot be timed on one rank).

    >>> import torch
    >>> from torch import nn
    >>> summary = compare_models(nn.Linear(64, 64), nn.Linear(64, 16), {"b1": torch.randn(1, 64)})
    >>> summary["params_dense"], summary["params_exported"], summary["macs_exported"]
    (4160, 1040, 1024)
    >>> sorted(k for k in summary if k.startswith("latency_b1"))[:3]
    ['latency_b1_dense_iqr_ms', 'latency_b1_dense_ms', 'latency_b1_exported_iqr_ms']
    """
    first = next(iter(inputs.values()))
    summary: dict[str, Any] = {
        "params_dense": count_params(dense),
        "params_exported": count_params(exported),
        "macs_dense": count_macs(dense, first),
        "macs_exported": count_macs(exported, first),
    }
    mac_ratio = summary["macs_exported"] / summary["macs_dense"] if summary["macs_dense"] else math.nan
    for name, example in inputs.items() if measure_latency else ():
        times = compare_latency({"dense": dense, "exported": exported}, example)
        for model, latency in times.items():
            summary[f"latency_{name}_{model}_ms"] = latency.median_ms
            summary[f"latency_{name}_{model}_iqr_ms"] = latency.spread_ms
        summary[f"latency_{name}_within_noise"] = latency_is_noise(times["dense"], times["exported"])
        summary[f"latency_{name}_per_mac"] = times["exported"].median_ms / times["dense"].median_ms / mac_ratio
    return summary


def format_report(report: dict[str, Any]) -> str:
    """An export report (as :class:`~lightning_prune.PruneExportCallback` makes it) as a small markdown table.

    >>> print(format_report({"params_dense": 1000, "params_exported": 400, "max_relative_error": 1e-7}))
    | | dense (masked) | exported |
    |---|---|---|
    | params | 1,000 | 400 |
    | max relative error | | 1.00e-07 |
    """
    rows = [
        ("params", "params_dense", "params_exported", "{:,.0f}"),
        ("MACs", "macs_dense", "macs_exported", "{:,.0f}"),
    ]
    for name in sorted({k.split("_")[1] for k in report if k.startswith("latency_") and k.endswith("_dense_ms")}):
        rows.append(
            (f"latency ms, {name} (median)", f"latency_{name}_dense_ms", f"latency_{name}_exported_ms", "{:.3f}")
        )
        rows.append(
            (f"latency ms, {name} (IQR)", f"latency_{name}_dense_iqr_ms", f"latency_{name}_exported_iqr_ms", "{:.3f}")
        )
    rows.append(("accuracy", "accuracy_masked", "accuracy_exported", "{:.4f}"))
    lines = ["| | dense (masked) | exported |", "|---|---|---|"]
    for label, dense, small, fmt in rows:
        if dense in report and small in report:
            lines.append(f"| {label} | {fmt.format(report[dense])} | {fmt.format(report[small])} |")
    for key in sorted(k for k in report if k.startswith("latency_") and k.endswith("_per_mac")):
        name = key.split("_")[1]
        noise = " (within this machine's noise)" if report.get(f"latency_{name}_within_noise") else ""
        lines.append(f"| latency ratio / MAC ratio, {name} | | {report[key]:.2f}{noise} |")
    for label, key, fmt in (
        ("max relative error", "max_relative_error", "{:.2e}"),
        ("change of function (whole_channel)", "function_change", "{:.2e}"),
        ("top-1 agreement", "top1_agreement", "{:.4f}"),
        ("export seconds", "export_seconds", "{:.3f}"),
    ):
        if report.get(key) is not None:
            lines.append(f"| {label} | | {fmt.format(report[key])} |")
    if report.get("schedule_complete") is False:  # stopped early (EarlyStopping, max_epochs): say so plainly
        done, planned = report.get("pruning_steps_done"), report.get("pruning_steps_planned")
        lines.append(f"| pruning steps | | {done} of {planned}: schedule NOT complete, partial masks exported |")
    return "\n".join(lines)
