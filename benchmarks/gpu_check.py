"""On a machine with a CUDA GPU: the quickstart's fine-tune-then-export on the GPU, checked; then the
deploy latency comparison of benchmarks/deploy.py on the GPU.

    python benchmarks/gpu_check.py                       # both parts
    python benchmarks/gpu_check.py --models resnet50 --round-to 1,8
    python benchmarks/gpu_check.py --deploy-on cpu --size 64 --models mobilenet_v2   # the second part's code, on CPU

Part 1 trains DigitsCNN on the GPU, prunes 50% with FPGM, fine-tunes masked, exports and verifies;
then checks that the exported model's parameters and the verification ran on the GPU, and that the
GPU export matches the masked model and reloads from the checkpoint to the same outputs.

Part 2 prunes each model with 50% group masks at each ``round_to`` (as benchmarks/deploy.py does),
then times dense and exported networks interleaved at batch 1 and 8: torch eager on the GPU, timed
with CUDA events (:func:`lightning_prune.core.verify.report.compare_latency` on CUDA inputs), and, where
onnxruntime offers the CUDA execution provider (the onnxruntime-gpu package), each ONNX file in
ONNX Runtime on the GPU with inputs and outputs bound on the device (I/O binding: no host copies
timed). Prints a table of median ms [IQR] and latency ratios against the MAC ratio.

Exits 2 with a message where no CUDA device is present (nothing was checked), 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_prune import PruneExportCallback, load_pruned_module, verify_equivalence
from lightning_prune.core.verify.report import format_report
from lightning_prune.lightning.demo import DigitsCNN, DigitsDataModule


def train_and_export() -> bool:
    """Part 1: the quickstart on the GPU; True when every check holds."""
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    callback = PruneExportCallback(pruner="fpgm", sparsity=0.5, prune_on_epoch=4)
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        max_epochs=8,
        default_root_dir=tempfile.mkdtemp(),
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    module = DigitsCNN()
    data = DigitsDataModule()
    trainer.fit(module, datamodule=data)
    report, small = callback.report, callback.exported_model
    images = next(iter(data.val_dataloader()))[0].cuda()
    on_gpu = next(small.parameters()).is_cuda and report["device"].startswith("cuda")
    same = verify_equivalence(module.cuda().eval(), small, images).passed
    reloaded = load_pruned_module(report["path"], DigitsCNN).cuda().eval()
    with torch.no_grad():
        reload_equal = torch.equal(reloaded(images), small(images))
    print(torch.cuda.get_device_name(0))
    print(format_report(report))
    print(f"export and verification on the GPU: {on_gpu}; GPU export == masked: {same}; reload equal: {reload_equal}")
    return bool(on_gpu and same and reload_equal)


def _benchmark() -> Any:
    """benchmarks/deploy.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "deploy_benchmark", os.path.join(os.path.dirname(__file__), "deploy.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class IoBoundSession(torch.nn.Module):
    """An ONNX Runtime session fed a device tensor and writing its output on the device (I/O binding)."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input = session.get_inputs()[0].name
        self.output = session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> Any:
        import numpy

        x = x.contiguous()
        index = x.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(self.input, "cuda", index, numpy.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output, "cuda", index)
        self.session.run_with_iobinding(binding)  # returns when the GPU work is done
        return binding.get_outputs()[0]


def deploy_latency(args: argparse.Namespace) -> bool:
    """Part 2: dense against exported latency on ``args.deploy_on``; prints the tables; True when it ran."""
    import onnxruntime

    bench = _benchmark()
    device = args.deploy_on
    cuda_ort = device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    timings = [("eager", 1), ("eager", 8)] + ([("ort", 1), ("ort", 8)] if cuda_ort or device == "cpu" else [])
    if device == "cuda" and not cuda_ort:
        print(
            f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (providers: "
            f"{', '.join(onnxruntime.get_available_providers())}; pip install onnxruntime-gpu): ONNX Runtime left out"
        )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models:
            variants, _ = bench.build_variants(name, args.round_to, args.size, [], args.ranking)
            example = torch.randn(1, 3, args.size, args.size)
            own = [
                {"model": name, "variant": tag, "params": bench.count_params(m), "macs": bench.count_macs(m, example)}
                for tag, m in variants.items()
            ]
            sessions: dict[str, torch.nn.Module] = {}
            if cuda_ort or device == "cpu":
                providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if cuda_ort else ("CPUExecutionProvider",)
                checked = bench.onnx_runtimes(variants, args.size, directory, "torchscript", providers=providers)
                sessions = {tag: IoBoundSession(s.session) if cuda_ort else s for tag, s in checked.items()}
            on_device = {tag: m.to(device) for tag, m in variants.items()}
            for runtime, batch in timings:
                models = on_device if runtime == "eager" else sessions
                with torch.no_grad():
                    times = bench.time_all(models, batch, args.size, args.budget * (3 if batch > 1 else 1), device)
                for row in own:
                    row[f"{runtime}_b{batch}"] = times[row["variant"]]
            rows += own
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(
        f"\n{name}: dense against exported, torch eager"
        + (" and ONNX Runtime" if len(timings) > 2 else "")
        + (" (CUDA events)" if device == "cuda" else "")
    )
    print(bench.table(rows, timings))
    print()
    print(bench.summary(rows, timings))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        type=lambda s: s.split(","),
        default=["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny"],
    )
    parser.add_argument("--round-to", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 16, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--ranking", choices=["uniform", "global"], default="uniform", help="as benchmarks/deploy.py (global: ragged)"
    )
    parser.add_argument(
        "--budget", type=float, default=2.0, help="seconds per batch-1 timing of one model's variants (x3 at batch 8)"
    )
    parser.add_argument(
        "--deploy-on",
        choices=["cuda", "cpu"],
        default="cuda",
        help="run only part 2, on this device (cpu: to try the script where there is no GPU)",
    )
    args = parser.parse_args(argv)
    if args.deploy_on == "cpu":
        torch.set_num_threads(1)  # as benchmarks/deploy.py: two spinning threads on shared cores time the neighbours
        return 0 if deploy_latency(args) else 1
    if not torch.cuda.is_available():
        print("no CUDA device on this machine: nothing to check (part 2's code runs on CPU with --deploy-on cpu)")
        return 2
    passed = train_and_export()
    deploy_latency(args)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
