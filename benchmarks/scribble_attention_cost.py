"""Cost of ScribbleAttentionTrainer against nnUNetTrainer: time per training iteration and peak memory.

For each configuration of a planned dataset, both trainers run the same number of training steps
(``train_step``: forward, loss, backward, optimiser) on the same synthetic batch of the plans' patch
and batch size, each in a fresh process, alternating, and the table reports the medians of the step
times and the peak memory of the steps. It then measures the attentive similarity loss alone on the
attention grid of that configuration, in the memory-linear formulation (tiles) and in the naive
``N × N`` one; the naive one is not run where its matrices alone would exceed ``--naive_limit_gib``.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during the steps, minus what was allocated before;
on CPU the peak resident set size during the steps (``VmHWM``, reset first) minus the resident size
before the first step. Synthetic batches: the plans and the network are the real ones, the images
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


def synthetic_batch(trainer, generator):
    import torch
    from nnunet_weak.transforms.sparse_downsampling import SparsePreservingDownsampleSegForDSTransform
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    batch = trainer.configuration_manager.batch_size
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


def measure_steps(dataset: str, configuration: str, plans: str, trainer_name: str, steps: int, device: str) -> dict:
    import torch
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    from nnunetv2.run.run_training import get_trainer_from_args
    torch.manual_seed(0)
    # synthetic batches: the trainer needs no preprocessed files to tell their format
    trainer_module.infer_dataset_class = lambda folder: None
    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, plans, device=torch.device(device))
    trainer.initialize()
    trainer.network.train()
    batch = synthetic_batch(trainer, torch.Generator().manual_seed(0))
    times = []
    with PeakMemory(trainer.device) as memory:
        for _ in range(steps + 1):
            start = time.perf_counter()
            trainer.train_step(batch)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times[1:]), "peak_mib": memory.mib,
            "patch": [int(p) for p in trainer.configuration_manager.patch_size],
            "batch": int(trainer.configuration_manager.batch_size),
            "attention": _attention_geometry(trainer) if trainer_name == METHOD else None}


def _attention_geometry(trainer) -> dict:
    from nnunet_weak.networks.encoder_stages import attached_blocks, cumulative_stage_strides, stage_channels
    (stage, _), = attached_blocks(trainer.network).items()
    stride = cumulative_stage_strides(trainer.network)[stage]
    grid = [p // s for p, s in zip(trainer.configuration_manager.patch_size, stride)]
    return {"grid": grid, "channels": stage_channels(trainer.network, stage), "classes": trainer.label_manager.num_segmentation_heads,
            "window_spacing": [float(s) * t for s, t in zip(trainer.configuration_manager.spacing, stride)],
            "batch": int(trainer.configuration_manager.batch_size)}


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

def child(*arguments) -> dict:
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, encoding="utf-8",
                            errors="replace")
    if result.returncode != 0:
        raise SystemExit(f"measurement {arguments} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def naive_matrices_gib(geometry: dict) -> float:
    """Memory of the naive formulation's N×N tensors kept for the backward pass (≈ 4 float32 per sample)."""
    n = 1
    for g in geometry["grid"]:
        n *= g
    return geometry["batch"] * n * n * 4 * 4 / 2 ** 30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset id or name (planned and in nnUNet_preprocessed)")
    parser.add_argument("-c", nargs="+", default=["2d"], help="configurations (default: 2d)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per run, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per trainer (median taken)")
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
            child("steps", args.d, configuration, args.p, trainer, str(args.steps), args.device))
    for configuration in args.c:
        base, method = results[(configuration, BASELINE)], results[(configuration, METHOD)]
        base_s, method_s = (statistics.median(r["seconds"] for r in runs) for runs in (base, method))
        base_m, method_m = (statistics.median(r["peak_mib"] for r in runs) for runs in (base, method))
        geometry = method[0]["attention"]
        tiles = child("loss", "tiles", json.dumps(geometry), args.device)
        estimate = naive_matrices_gib(geometry)
        naive = (child("loss", "naive", json.dumps(geometry), args.device) if estimate <= args.naive_limit_gib
                 else None)
        rows.append({"configuration": configuration, "patch": "x".join(map(str, method[0]["patch"])),
                     "batch": method[0]["batch"], "grid": "x".join(map(str, geometry["grid"])),
                     "base_s": base_s, "method_s": method_s, "base_m": base_m, "method_m": method_m,
                     "tiles_m": tiles["peak_mib"], "naive": naive, "estimate": estimate})
    lines = [f"Dataset {args.d}, plans {args.p}, device {args.device}; median of {args.rounds} runs x {args.steps} "
             f"steps (after a warm-up step), synthetic batches of the planned patch and batch size.", "",
             "| configuration | patch x batch | attention grid | s/iter nnUNetTrainer | s/iter ScribbleAttention | "
             "time ratio | peak MiB nnUNetTrainer | peak MiB ScribbleAttention | memory ratio | L_att peak MiB "
             "(ours) | L_att peak MiB (naive N×N) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        naive = (f"{r['naive']['peak_mib']:.0f}" if r["naive"] is not None
                 else f"not run (its N×N matrices alone: ~{r['estimate']:.0f} GiB)")
        lines.append(f"| {r['configuration']} | {r['patch']} x {r['batch']} | {r['grid']} | {r['base_s']:.2f} | "
                     f"{r['method_s']:.2f} | {r['method_s'] / r['base_s']:.2f} | {r['base_m']:.0f} | {r['method_m']:.0f} | "
                     f"{r['method_m'] / r['base_m']:.2f} | {r['tiles_m']:.0f} | {naive} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.o:
        write_text_atomic(table, args.o)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("steps", "loss"):
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        if sys.argv[1] == "steps":
            print(json.dumps(measure_steps(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]),
                                           sys.argv[7])))
        else:
            print(json.dumps(measure_loss(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])))
        sys.exit(0)
    sys.exit(main())
