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

Memory and batches as in ``benchmarks/training_cost.py``, whose measurements this script reuses: the
mmap threshold of the children matters here most (with glibc's default, the tiled loss on a 3D grid
at batch 5 held 1.5 GiB resident against 0.3 GiB with the threshold).

    eval "$(nnunet-weak env --root /tmp/phantom)"   # a dataset planned with nnU-Net, e.g. the phantom:
    nnunet-weak convert phantom && nnUNetv2_plan_and_preprocess -d 901 -c 2d 3d_fullres
    nnunet-weak plan_and_preprocess -d 902 -c 2d 3d_fullres --plans_from 901
    python benchmarks/scribble_attention_cost.py -d 902 -c 2d 3d_fullres -o cost.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import training_cost
from nnunet_weak.atomic import write_text_atomic
from training_cost import BASELINE, PeakMemory, median_or_none, number, ratio

METHOD = "ScribbleAttentionTrainer"


# ---- measured in a child process -------------------------------------------------------------------

def attention_geometry(dataset: str, configuration: str, plans: str, batch: int) -> dict:
    """Where the method's block sits in the planned network: its grid, channels and window spacing."""
    from nnunet_weak.networks.encoder_stages import attached_blocks, cumulative_stage_strides, stage_channels
    trainer = training_cost.make_trainer(dataset, configuration, plans, METHOD, "cpu")
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
    return training_cost.child(__file__, *arguments)


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


def _size(gib: float) -> str:
    return f"~{gib:.1f} GiB" if gib >= 1 else f"~{gib * 1024:.0f} MiB"


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
    results = training_cost.measure_trainers(__file__, args.d, args.c, args.p, (BASELINE, METHOD), args.rounds,
                                             args.steps, args.device, args.batch_size)
    for configuration in tqdm(args.c, desc="block and loss alone"):
        geometry = child("geometry", args.d, configuration, args.p, str(args.batch_size))
        base, method = results[(configuration, BASELINE)], results[(configuration, METHOD)]
        estimate = naive_loss_gib(geometry)
        rows.append({"configuration": configuration, "patch": "x".join(map(str, geometry["patch"])),
                     "batch": geometry["batch"], "grid": "x".join(map(str, geometry["grid"])),
                     "base_s": median_or_none(base, "seconds"), "method_s": median_or_none(method, "seconds"),
                     "base_m": median_or_none(base, "peak_mib"), "method_m": median_or_none(method, "peak_mib"),
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
            naive = number(r["naive"]["peak_mib"], 0)
        else:
            naive = f"not run (its N×N matrices alone: {_size(r['estimate'])})"
        block, tiles = r["block"] and r["block"]["peak_mib"], r["tiles"] and r["tiles"]["peak_mib"]
        lines.append(f"| {r['configuration']} | {r['patch']} x {r['batch']} | {r['grid']} | {number(r['base_s'], 2)} | "
                     f"{number(r['method_s'], 2)} | {ratio(r['method_s'], r['base_s'])} | {number(r['base_m'], 0)} | "
                     f"{number(r['method_m'], 0)} | {ratio(r['method_m'], r['base_m'])} | {number(block, 0)} | "
                     f"{_size(r['naive_attention'])} | {number(tiles, 0)} | {naive} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.o:
        write_text_atomic(table, args.o)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("steps", "geometry", "block", "loss"):
        training_cost.prepare_child()
        command, arguments = sys.argv[1], sys.argv[2:]
        if command == "steps":
            training_cost.run_child_command()
            sys.exit(0)
        if command == "geometry":
            result = attention_geometry(*arguments[:3], int(arguments[3]))
        elif command == "block":
            result = measure_block(json.loads(arguments[0]), arguments[1])
        else:
            result = measure_loss(arguments[0], json.loads(arguments[1]), arguments[2])
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
