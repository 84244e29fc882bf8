"""Cost of ScribbleAttentionTrainer against nnUNetTrainer: time per training iteration and peak memory.

For each configuration of a planned dataset, both trainers run the same number of training steps
(``train_step``: forward, loss, backward, optimiser) on the same synthetic batch of the plans' patch
and batch size (``--batch_size`` overrides the batch size for a machine that cannot hold it), each
in a fresh process, alternating, and the table reports the medians of the step times and the peak
memory of the steps; a run the system kills (out of memory) is reported as such. It then measures
on the attention grid of that configuration the attention block alone (fused attention, beside the
size of the N × N matrices an unfused one would keep) and the attentive similarity loss alone, in the
memory-linear formulation (tiles) and in the naive ``N × N`` one; the naive one is not run where its
matrices alone would exceed ``--naive_limit_gib``.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during the steps, minus what was allocated before;
on CPU the peak resident set size during the steps (``VmHWM``, reset first) minus the resident size
before the first step. CPU children run with glibc's ``MALLOC_MMAP_THRESHOLD_`` at 1 MiB, so that a
freed tensor goes back to the system and the resident size follows the live tensors: with glibc's
default, heap fragmentation from many mid-sized tensors inflated it (the tiled loss on a 3D grid at
batch 5: 1.5 GiB resident against 0.3 GiB with the threshold). Synthetic batches: the plans and the network are the real ones, the images
random, the sparse labels 2 % annotated; nothing is read from the preprocessed data.

    eval "$(nnunet-weak env --root /tmp/phantom)"   # a dataset planned with nnU-Net, e.g. the phantom:
    nnunet-weak convert phantom && nnUNetv2_plan_and_preprocess -d 901 -c 2d 3d_fullres
    nnunet-weak plan_and_preprocess -d 902 -c 2d 3d_fullres --plans_from 901
    python benchmarks/scribble_attention_cost.py -d 902 -c 2d 3d_fullres -o cost.md
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

BASELINE, METHOD = "nnUNetTrainer", "ScribbleAttentionTrainer"


# ---- measured in a child process -------------------------------------------------------------------

def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
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


def synthetic_batch(trainer, generator, batch: int):
    import torch
    from nnunet_weak.transforms.sparse_downsampling import SparsePreservingDownsampleSegForDSTransform
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    data = torch.randn(batch, trainer.num_input_channels, *patch, generator=generator)
    ignore = trainer.label_manager.ignore_label
    classes = len(trainer.label_manager.all_labels) - (ignore is not None)
    labels = torch.randint(0, classes, (batch, 1, *patch), generator=generator)
    if ignore is not None:
        labels[torch.rand(labels.shape, generator=generator) > 0.02] = ignore
    scales = trainer._get_deep_supervision_scales()
    target = [SparsePreservingDownsampleSegForDSTransform(scales, ignore if ignore is not None else classes)(
        segmentation=sample)["segmentation"] for sample in labels.to(torch.int16)]
    target = [torch.stack([t[s] for t in target]) for s in range(len(scales))]
    return {"data": data, "target": target, "keys": [f"synthetic_{i}" for i in range(batch)]}


def measure_steps(dataset: str, configuration: str, plans: str, trainer_name: str, steps: int, device: str,
                  batch: int) -> dict:
    import torch
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    from nnunetv2.run.run_training import get_trainer_from_args
    torch.manual_seed(0)
    # synthetic batches: the trainer needs no preprocessed files to tell their format
    trainer_module.infer_dataset_class = lambda folder: None
    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, plans, device=torch.device(device))
    trainer.initialize()
    trainer.network.train()
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
            "patch": [int(p) for p in trainer.configuration_manager.patch_size],
            "batch": batch}


def attention_geometry(dataset: str, configuration: str, plans: str, batch: int) -> dict:
    """Where the method's block sits in the planned network: its grid, channels and window spacing."""
    import torch
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunet_weak.networks.encoder_stages import attached_blocks, cumulative_stage_strides, stage_channels
    trainer_module.infer_dataset_class = lambda folder: None
    trainer = get_trainer_from_args(dataset, configuration, 0, METHOD, plans, device=torch.device("cpu"))
    trainer.initialize()
    (stage, _), = attached_blocks(trainer.network).items()
    stride = cumulative_stage_strides(trainer.network)[stage]
    grid = [p // s for p, s in zip(trainer.configuration_manager.patch_size, stride)]
    return {"grid": grid, "channels": stage_channels(trainer.network, stage), "classes": trainer.label_manager.num_segmentation_heads,
            "window_spacing": [float(s) * t for s, t in zip(trainer.configuration_manager.spacing, stride)],
            "batch": batch or int(trainer.configuration_manager.batch_size),
            "patch": [int(p) for p in trainer.configuration_manager.patch_size]}


def measure_block(geometry: dict, device: str) -> dict:
    """Forward and backward of the attention block alone on the grid of the planned patch."""
    import torch
    from nnunet_weak.networks.spatial_self_attention import SpatialSelfAttentionBlock
    device = torch.device(device)
    block = SpatialSelfAttentionBlock(geometry["channels"], len(geometry["grid"])).to(device).train()
    features = torch.randn(geometry["batch"], geometry["channels"], *geometry["grid"],
                           generator=torch.Generator().manual_seed(0)).to(device).requires_grad_(True)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        block(features).sum().backward()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": memory.mib}


def measure_loss(formulation: str, geometry: dict, device: str) -> dict:
    import torch
    from nnunet_weak.losses.attentive_similarity import attentive_similarity_loss, dense_attentive_similarity_loss
    from nnunet_weak.losses.local_window import LocalWindow
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    batch, channels, grid = geometry["batch"], geometry["channels"], geometry["grid"]
    queries = torch.randn(batch, channels, *grid, generator=generator).to(device).requires_grad_(True)
    keys = torch.randn(batch, channels, *grid, generator=generator).to(device).requires_grad_(True)
    logits = torch.randn(batch, geometry["classes"], *grid, generator=generator).to(device).requires_grad_(True)
    w = torch.ones((), device=device, requires_grad=True)
    b = torch.zeros((), device=device, requires_grad=True)
    window = LocalWindow.gaussian(5, 6.0, geometry["window_spacing"])
    loss_function = attentive_similarity_loss if formulation == "tiles" else dense_attentive_similarity_loss
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        loss_function(torch.softmax(logits, 1), queries, keys, w, b, window).backward()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": memory.mib}


# ---- the parent: runs the children, prints the table -----------------------------------------------

def child(*arguments) -> dict | None:
    """Runs one measurement in a fresh process; ``None`` if the system killed it (out of memory, as a rule)."""
    environment = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), **os.environ}
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, encoding="utf-8",
                            errors="replace", env=environment)
    if result.returncode < 0:
        print(f"measurement {arguments} was killed by signal {-result.returncode} (out of memory?)", file=sys.stderr)
        return None
    if result.returncode != 0:
        raise SystemExit(f"measurement {arguments} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def positions(geometry: dict) -> int:
    n = 1
    for g in geometry["grid"]:
        n *= g
    return n


def naive_loss_gib(geometry: dict) -> float:
    """Memory of the naive loss's N×N tensors kept for the backward pass (≈ 4 float32 per sample)."""
    return geometry["batch"] * positions(geometry) ** 2 * 4 * 4 / 2 ** 30


def naive_attention_gib(geometry: dict) -> float:
    """Memory of an unfused attention's N×N tensors kept for the backward pass (logits and soft-max, float32)."""
    return geometry["batch"] * positions(geometry) ** 2 * 4 * 2 / 2 ** 30


def _median_or_none(runs: list, key: str):
    values = [r[key] for r in runs if r is not None]
    return statistics.median(values) if len(values) == len(runs) else None


def _number(value, digits: int, killed: str = "killed (out of memory)") -> str:
    return killed if value is None else f"{value:.{digits}f}"


def _size(gib: float) -> str:
    return f"~{gib:.1f} GiB" if gib >= 1 else f"~{gib * 1024:.0f} MiB"


def _ratio(numerator, denominator) -> str:
    return "-" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset id or name (planned and in nnUNet_preprocessed)")
    parser.add_argument("-c", nargs="+", default=["2d"], help="configurations (default: 2d)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per run, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per trainer (median taken)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="batch size of the synthetic batches (default: the plans'); for a machine that cannot "
                             "hold the planned batch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--naive_limit_gib", type=float, default=8.0,
                        help="skip the naive N×N loss above this estimated size (default: 8)")
    parser.add_argument("-o", default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    from tqdm import tqdm

    rows = []
    jobs = [(c, r, t) for c in args.c for r in range(args.rounds) for t in (BASELINE, METHOD)]
    results: dict = {}
    for configuration, _, trainer in tqdm(jobs, desc="training-step runs"):
        results.setdefault((configuration, trainer), []).append(
            child("steps", args.d, configuration, args.p, trainer, str(args.steps), args.device, str(args.batch_size)))
    for configuration in tqdm(args.c, desc="block and loss alone"):
        geometry = child("geometry", args.d, configuration, args.p, str(args.batch_size))
        base, method = results[(configuration, BASELINE)], results[(configuration, METHOD)]
        estimate = naive_loss_gib(geometry)
        rows.append({"configuration": configuration, "patch": "x".join(map(str, geometry["patch"])),
                     "batch": geometry["batch"], "grid": "x".join(map(str, geometry["grid"])),
                     "base_s": _median_or_none(base, "seconds"), "method_s": _median_or_none(method, "seconds"),
                     "base_m": _median_or_none(base, "peak_mib"), "method_m": _median_or_none(method, "peak_mib"),
                     "block": child("block", json.dumps(geometry), args.device),
                     "naive_attention": naive_attention_gib(geometry),
                     "tiles": child("loss", "tiles", json.dumps(geometry), args.device),
                     "naive": (child("loss", "naive", json.dumps(geometry), args.device)
                               if estimate <= args.naive_limit_gib else None), "estimate": estimate})
    lines = [f"Dataset {args.d}, plans {args.p}, device {args.device}; median of {args.rounds} runs x {args.steps} "
             f"steps (after a warm-up step), synthetic batches of the planned patch size.", "",
             "| configuration | patch x batch | attention grid | s/iter nnUNetTrainer | s/iter ScribbleAttention | "
             "time ratio | peak MiB nnUNetTrainer | peak MiB ScribbleAttention | memory ratio | block alone: peak MiB "
             "(fused) | block: N×N attention (unfused) | L_att peak MiB (ours) | L_att peak MiB (naive N×N) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["naive"] is not None:
            naive = _number(r["naive"]["peak_mib"], 0)
        else:
            naive = f"not run (its N×N matrices alone: {_size(r['estimate'])})"
        block, tiles = r["block"] and r["block"]["peak_mib"], r["tiles"] and r["tiles"]["peak_mib"]
        lines.append(f"| {r['configuration']} | {r['patch']} x {r['batch']} | {r['grid']} | {_number(r['base_s'], 2)} | "
                     f"{_number(r['method_s'], 2)} | {_ratio(r['method_s'], r['base_s'])} | {_number(r['base_m'], 0)} | "
                     f"{_number(r['method_m'], 0)} | {_ratio(r['method_m'], r['base_m'])} | {_number(block, 0)} | "
                     f"{_size(r['naive_attention'])} | {_number(tiles, 0)} | {naive} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.o:
        write_text_atomic(table, args.o)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("steps", "geometry", "block", "loss"):
        # nnU-Net writes a training log wherever a trainer is made: keep the user's results folder clean
        os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="scribble_attention_cost_")
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        command, arguments = sys.argv[1], sys.argv[2:]
        if command == "steps":
            result = measure_steps(*arguments[:4], int(arguments[4]), arguments[5], int(arguments[6]))
        elif command == "geometry":
            result = attention_geometry(*arguments[:3], int(arguments[3]))
        elif command == "block":
            result = measure_block(json.loads(arguments[0]), arguments[1])
        else:
            result = measure_loss(arguments[0], json.loads(arguments[1]), arguments[2])
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
