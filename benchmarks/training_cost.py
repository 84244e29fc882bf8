"""Cost of a method trainer against nnUNetTrainer: time per training iteration and peak memory.

For each configuration of a planned dataset, both trainers run the same number of training steps
(``train_step``: forward, loss, backward, optimiser) on the same synthetic batch of the plans' patch
and batch size (``--batch_size`` overrides the batch size for a machine that cannot hold it), each
in a fresh process, alternating; the table reports the medians of the step times and of the peak
memory of the steps, and their ratios. A run the system kills (out of memory) is reported as such.
Two-stream trainers get two-stream batches as their loader makes them: semi-supervised (labelled, then
unlabelled samples) or mixed supervision (strong, then weak samples, each with its weak map); KAF's
pre-training gets pairs of neighbouring slices with their positions.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during the steps, minus what was allocated before;
on CPU the peak resident set size during the steps (``VmHWM``, reset first) minus the resident size
before the first step. CPU children run with glibc's ``MALLOC_MMAP_THRESHOLD_`` at 1 MiB, so that a
freed tensor goes back to the system and the resident size follows the live tensors (with glibc's
default, heap fragmentation from many mid-sized tensors inflated it). Synthetic batches: the plans and
the network are the real ones, the images random, sparse labels 2 % annotated, unlabelled samples
ignore everywhere, every voxel inside the image (for trainers that mark the image's extent); nothing is
read from the preprocessed data.

    eval "$(nnunet-weak env --root /tmp/phantom)"
    python benchmarks/training_cost.py -d 982 -c 2d 3d_fullres --method CAMLTrainer -o cost.md

``benchmarks/scribble_attention_cost.py`` builds on these measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nnunet_weak.atomic import write_text_atomic

BASELINE = "nnUNetTrainer"


# ---- measured in a child process -------------------------------------------------------------------

def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory (MiB) of what runs inside the context, above what was in use when it started."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
            self.start = _resident_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _resident_kib("VmHWM") * 1024
        self.mib = (peak - self.start) / 2 ** 20


def synthetic_batch(trainer, generator, batch: int) -> dict:
    """A training batch of the trainer's patch, for ``batch`` samples; for two-stream trainers the two streams as
    their loader makes them: semi-supervised (``labelled`` mask, unlabelled samples ignore everywhere) or mixed
    (``strong`` mask, a second target channel holding every sample's weak map); for KAF's pre-training, pairs of
    slices (``slice_position``, ``neighbour``) as ``NeighbourSliceDataLoader`` makes them."""
    import torch
    from nnunet_weak.networks.encoder_stages import unwrap_network
    from nnunet_weak.networks.keypoint_pretraining import KeypointPretrainingNetwork
    from nnunet_weak.transforms.image_extent import INSIDE_IMAGE
    from nnunet_weak.training.mixed_supervision import MixedSupervisionTrainer
    from nnunet_weak.training.semi_supervised import TwoStreamTrainer
    from nnunet_weak.training.two_stream import split_batch
    from nnunet_weak.transforms.sparse_downsampling import SparsePreservingDownsampleSegForDSTransform
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    data = torch.randn(batch, trainer.num_input_channels, *patch, generator=generator)
    ignore = trainer.label_manager.ignore_label
    classes = len(trainer.label_manager.all_labels) - (ignore is not None)
    dense = torch.randint(0, classes, (batch, 1, *patch), generator=generator)
    labels = dense.clone()
    if ignore is not None:
        labels[torch.rand(labels.shape, generator=generator) > 0.02] = ignore
    extra = {}
    if isinstance(trainer, TwoStreamTrainer):
        first_count, _ = split_batch(batch, trainer.first_stream_per_batch(), trainer.streams)
        first = torch.arange(batch) < first_count
        extra[trainer.streams[0]] = first
        if isinstance(trainer, MixedSupervisionTrainer):
            strong = first.view(-1, *[1] * (dense.ndim - 1))
            labels = torch.cat((torch.where(strong, dense, labels), labels), 1)
        else:
            labels[first_count:] = ignore
    if isinstance(unwrap_network(trainer.network), KeypointPretrainingNetwork):
        pairs = batch // 2
        batch, data, dense, labels = 2 * pairs, data[:2 * pairs], dense[:2 * pairs], labels[:2 * pairs]
        anchor = torch.rand(pairs, generator=generator)
        extra["slice_position"] = torch.cat((anchor, (anchor + 0.1).clamp(max=1)))
        extra["neighbour"] = torch.cat((torch.arange(pairs, 2 * pairs), torch.arange(pairs)))
    scales = trainer._get_deep_supervision_scales()
    target = [SparsePreservingDownsampleSegForDSTransform(scales, ignore if ignore is not None else classes)(
        segmentation=sample)["segmentation"] for sample in labels.to(torch.int16)]
    target = [torch.stack([t[s] for t in target]) for s in range(len(scales))]
    if getattr(trainer, "marks_image_extent", False):  # every voxel inside the image
        target = [torch.cat((t, torch.full_like(t[:, :1], INSIDE_IMAGE)), 1) for t in target]
    return {"data": data, "target": target, "keys": [f"synthetic_{i}" for i in range(batch)], **extra}


def make_trainer(dataset: str, configuration: str, plans: str, trainer_name: str, device: str):
    """An initialised trainer in training mode, without reading preprocessed files."""
    import torch
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    from nnunetv2.run.run_training import get_trainer_from_args
    torch.manual_seed(0)
    # synthetic batches: the trainer needs no preprocessed files to tell their format
    trainer_module.infer_dataset_class = lambda folder: None
    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, plans, device=torch.device(device))
    trainer.initialize()
    trainer.network.train()
    return trainer


def measure_steps(dataset: str, configuration: str, plans: str, trainer_name: str, steps: int, device: str,
                  batch: int) -> dict:
    import torch
    trainer = make_trainer(dataset, configuration, plans, trainer_name, device)
    batch = batch or int(trainer.configuration_manager.batch_size)
    samples = synthetic_batch(trainer, torch.Generator().manual_seed(0), batch)
    times = []
    with PeakMemory(trainer.device) as memory:
        for _ in range(steps + 1):
            start = time.perf_counter()
            trainer.train_step(samples)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times[1:]), "peak_mib": memory.mib,
            "patch": [int(p) for p in trainer.configuration_manager.patch_size], "batch": batch}


# ---- the parent ------------------------------------------------------------------------------------

def child(script: str, *arguments) -> dict | None:
    """Runs one measurement of ``script`` in a fresh process; ``None`` if the system killed it (out of
    memory, as a rule)."""
    environment = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), **os.environ}
    result = subprocess.run([sys.executable, script, *arguments], capture_output=True, encoding="utf-8",
                            errors="replace", env=environment)
    if result.returncode < 0:
        print(f"measurement {arguments} was killed by signal {-result.returncode} (out of memory?)", file=sys.stderr)
        return None
    if result.returncode != 0:
        raise SystemExit(f"measurement {arguments} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_trainers(script: str, dataset: str, configurations, plans: str, trainers, rounds: int, steps: int,
                     device: str, batch_size: int) -> dict:
    """``{(configuration, trainer): [run, ...]}``, runs alternating between trainers, each in a fresh process."""
    from tqdm import tqdm
    jobs = [(c, r, t) for c in configurations for r in range(rounds) for t in trainers]
    results: dict = {}
    for configuration, _, trainer in tqdm(jobs, desc="training-step runs"):
        results.setdefault((configuration, trainer), []).append(
            child(script, "steps", dataset, configuration, plans, trainer, str(steps), device, str(batch_size)))
    return results


def median_or_none(runs: list, key: str):
    values = [r[key] for r in runs if r is not None]
    return statistics.median(values) if len(values) == len(runs) else None


def number(value, digits: int, killed: str = "killed (out of memory)") -> str:
    return killed if value is None else f"{value:.{digits}f}"


def ratio(numerator, denominator) -> str:
    return "-" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def emit_table(table: str, output: str | None) -> None:
    """Print the markdown ``table``; also write it to ``output`` (if given), atomically."""
    print(table)
    if output:
        write_text_atomic(table, output)


def run_child_command() -> None:
    """The child side of :func:`child` for the ``steps`` measurement."""
    arguments = sys.argv[2:]
    print(json.dumps(measure_steps(*arguments[:4], int(arguments[4]), arguments[5], int(arguments[6]))))


def prepare_child() -> None:
    # nnU-Net writes a training log wherever a trainer is made: keep the user's results folder clean
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="nnunet_weak_cost_")
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset id or name (planned and in nnUNet_preprocessed)")
    parser.add_argument("-c", nargs="+", default=["2d"], help="configurations (default: 2d)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("--method", required=True, help="the trainer to compare with nnUNetTrainer")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per run, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per trainer (median taken)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="batch size of the synthetic batches (default: the plans')")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("-o", default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    results = measure_trainers(__file__, args.d, args.c, args.p, (BASELINE, args.method), args.rounds, args.steps,
                               args.device, args.batch_size)
    lines = [f"Dataset {args.d}, plans {args.p}, device {args.device}; median of {args.rounds} runs x {args.steps} "
             f"steps (after a warm-up step), synthetic batches of the planned patch size.", "",
             f"| configuration | patch x batch | s/iter {BASELINE} | s/iter {args.method} | time ratio | "
             f"peak MiB {BASELINE} | peak MiB {args.method} | memory ratio |", "|---|---|---|---|---|---|---|---|"]
    for configuration in args.c:
        base, method = results[(configuration, BASELINE)], results[(configuration, args.method)]
        shape = next((r for r in base + method if r is not None), None)
        patch = "?" if shape is None else f"{'x'.join(map(str, shape['patch']))} x {shape['batch']}"
        base_s, method_s = median_or_none(base, "seconds"), median_or_none(method, "seconds")
        base_m, method_m = median_or_none(base, "peak_mib"), median_or_none(method, "peak_mib")
        lines.append(f"| {configuration} | {patch} | {number(base_s, 2)} | {number(method_s, 2)} | "
                     f"{ratio(method_s, base_s)} | {number(base_m, 0)} | {number(method_m, 0)} | "
                     f"{ratio(method_m, base_m)} |")
    emit_table("\n".join(lines) + "\n", args.o)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "steps":
        prepare_child()
        run_child_command()
        sys.exit(0)
    sys.exit(main())
