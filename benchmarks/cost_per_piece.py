"""What each trainer's training step costs, piece by piece: counted FLOPs beside measured time and memory.

For nnUNetTrainer (the floor) and each given trainer, in a fresh process, on the synthetic batch of
``training_cost.py`` (the plans' real network, patch and batch; random images; two-stream batches as each
trainer's loader makes them):

- **counted**: ``torch.utils.flop_counter.FlopCounterMode`` over one whole ``train_step`` (forward, loss,
  backward, optimiser), and over each piece of the training network run alone (forward + backward) on the
  inputs it received in that step: the planned network, a block attached to its encoder (the scribble
  trainer's attention block, KAF's fusion layers; its network's row is without it), and every
  training-only module of a ``TrainingNetwork`` (second network or decoder, heads, teacher). The step minus
  the pieces is "losses and the rest": the loss terms and the optimiser. FlopCounterMode counts matrix products
  and convolutions (the operations that set a network's cost); element-wise work (the gated CRF's kernel,
  soft-max, normalisation) counts zero, so a loss made of it has a floor of zero FLOPs here.
- **measured**: the median step time over ``--steps`` steps after a warm-up step, the step's peak memory
  (``training_cost.PeakMemory``), and per piece its forward + backward run alone on the inputs it received
  in a step (as many times as the step calls it, median of 3), with its peak memory. "losses and the rest"
  is the step time minus the pieces'. Data loading is not in a step: nnU-Net's background workers augment
  while the step runs (``training_cost.py`` times steps the same way).

Each trainer's FLOP ratio (its counted FLOPs over nnUNetTrainer's, the floor of its time ratio if time
followed FLOPs) is printed beside its measured time ratio, and their quotient: how far above the floor.

    eval "$(nnunet-weak env --root /work/nnunet_data)"
    python benchmarks/cost_per_piece.py -d 27 -p nnUNetPlansCPU --trainers ScribbleAttentionTrainer -o cost_27.md

Time on CPU varies by a few per cent between runs of one trainer; ``--rounds`` alternates the trainers'
runs and takes medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_cost import (BASELINE, PeakMemory, child, emit_table, make_trainer, prepare_child,  # noqa: E402
                           synthetic_batch)


REST = "losses and the rest"


# ---- measured in a child process -------------------------------------------------------------------

def training_pieces(network) -> dict:
    """``{name: module}``: the planned network (or each module of a ``TrainingNetwork``), and each block attached
    after an encoder stage of one of them, named after it."""
    from nnunet_weak.networks.encoder_stages import attached_blocks, unwrap_network
    from nnunet_weak.networks.training_network import TrainingNetwork
    network = unwrap_network(network)
    top = dict(network.named_children()) if isinstance(network, TrainingNetwork) else {"planned network": network}
    pieces = {}
    for name, module in top.items():
        if not any(True for _ in module.parameters()):
            continue
        pieces[name] = module
        if hasattr(module, "encoder") or hasattr(module, "stages"):
            for stage, block in attached_blocks(module).items():
                pieces[f"{name}: block after encoder stage {stage}"] = block
    return pieces


def tensors_in(value) -> list:
    import torch
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def detached(value):
    """``value`` with every floating tensor detached (and requiring a gradient where the original did)."""
    import torch
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        return copy.requires_grad_(value.requires_grad) if copy.is_floating_point() else copy
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(detached(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(detached(v) for v in value)
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    return value


def run_piece(module, arguments, keywords, with_gradient: bool) -> None:
    """One forward pass of ``module`` and, ``with_gradient``, the backward pass of the sum of its outputs."""
    import torch
    arguments, keywords = detached(arguments), detached(keywords)
    with torch.enable_grad() if with_gradient else torch.no_grad():
        outputs = [t for t in tensors_in(module(*arguments, **keywords)) if t.requires_grad]
    if with_gradient and outputs:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


def measure_pieces(dataset: str, configuration: str, plans: str, trainer_name: str, steps: int, device: str) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from nnunet_weak.networks.encoder_stages import unwrap_network
    trainer = make_trainer(dataset, configuration, plans, trainer_name, device)
    batch = synthetic_batch(trainer, torch.Generator().manual_seed(0), int(trainer.configuration_manager.batch_size))
    trainer.train_step(batch)  # warm-up; the memory banks and queues fill

    network = unwrap_network(trainer.network)
    pieces = training_pieces(network)
    # what each piece ran in the step, as (module, positional and keyword inputs, whether its output had a
    # gradient); a network of which the step runs parts only (an encoder, a decoder) is those parts' calls
    calls: dict = {}

    def record(key, module):
        def hook(_, arguments, keywords, output):
            calls.setdefault(key, []).append((module, arguments, keywords,
                                              any(t.requires_grad for t in tensors_in(output))))
        return module.register_forward_hook(hook, with_kwargs=True)

    handles = []
    for name, module in pieces.items():
        handles.append(record(name, module))
        handles += [record((name, child), submodule) for child, submodule in module.named_children()]
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch)
    for handle in handles:
        handle.remove()
    parts = {name: [] if name in calls else [key[1] for key in calls if isinstance(key, tuple) and key[0] == name]
             for name in pieces}
    calls = {name: calls.get(name) or [call for part in parts[name] for call in calls[(name, part)]] for name in pieces}
    total_flops = counter.get_total_flops()
    # per piece, counted on its own replay: FlopCounterMode's attribution of backward operations to modules
    # misses some (the last ones of a backward pass count as global)
    flops = {}
    for name in pieces:
        with FlopCounterMode(display=False) as counter:
            for called, arguments, keywords, with_gradient in calls[name]:
                run_piece(called, arguments, keywords, with_gradient)
        flops[name] = counter.get_total_flops()
    # a block is inside its network: the network's row is what remains
    for name in pieces:
        if ": block after encoder stage" in name:
            flops[name.split(":")[0]] -= flops[name]

    step_times = []
    with PeakMemory(trainer.device) as step_memory:
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step(batch)
            step_times.append(time.perf_counter() - start)
    seconds, milliseconds, memory = statistics.median(step_times), {}, {}
    for name in pieces:
        repeats = []
        with PeakMemory(trainer.device) as piece_memory:
            for _ in range(3):
                start = time.perf_counter()
                for called, arguments, keywords, with_gradient in calls[name]:
                    run_piece(called, arguments, keywords, with_gradient)
                repeats.append(time.perf_counter() - start)
        milliseconds[name], memory[name] = 1000 * statistics.median(repeats), piece_memory.mib
    for name in pieces:
        if ": block after encoder stage" in name:
            milliseconds[name.split(":")[0]] -= milliseconds[name]
    milliseconds[REST] = 1000 * seconds - sum(milliseconds.values())
    flops[REST] = total_flops - sum(flops.values())
    memory[REST] = None
    return {"pieces": list(pieces) + [REST], "flops": flops, "milliseconds": milliseconds, "peak_mib": memory,
            "total_flops": total_flops, "seconds": seconds, "step_peak_mib": step_memory.mib,
            "calls": {name: len(c) for name, c in calls.items()}, "parts": parts}


# ---- the parent ------------------------------------------------------------------------------------

def median_run(runs: list) -> dict | None:
    """The runs of one trainer as one: counted FLOPs (the same in every run), medians of every time and memory;
    ``None`` if a run was killed."""
    if any(run is None for run in runs):
        return None
    first = runs[0]

    def median(key, piece=None):
        values = [run[key] if piece is None else run[key][piece] for run in runs]
        return None if values[0] is None else statistics.median(values)

    return {**first, "seconds": median("seconds"), "step_peak_mib": median("step_peak_mib"),
            "milliseconds": {piece: median("milliseconds", piece) for piece in first["pieces"]},
            "peak_mib": {piece: median("peak_mib", piece) for piece in first["pieces"]}}


def piece_table(trainer: str, result: dict) -> list[str]:
    lines = [f"**{trainer}**: {result['total_flops'] / 1e9:.1f} GFLOP, {result['seconds']:.2f} s, "
             f"{result['step_peak_mib']:.0f} MiB per step", "",
             "| piece | GFLOP | share of FLOPs | ms (alone) | share of time | peak MiB (alone) |",
             "|---|---|---|---|---|---|"]
    for name in result["pieces"]:
        gflop, ms, mib = result["flops"][name] / 1e9, result["milliseconds"][name], result["peak_mib"][name]
        calls, parts = result["calls"].get(name, 1), result["parts"].get(name)
        label = f"{name} ({' + '.join(parts)})" if parts else name if calls <= 1 else f"{name} ({calls} calls)"
        lines.append(f"| {label} | {gflop:.2f} | {gflop * 1e9 / result['total_flops']:.0%} | {ms:.0f} | "
                     f"{ms / (1000 * result['seconds']):.0%} | {'-' if mib is None else f'{mib:.0f}'} |")
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset id or name (planned, with the supervision the trainers "
                                                  "need: scribbles, mixed or semi-supervised)")
    parser.add_argument("-c", default="2d", help="configuration (default: 2d)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("--trainers", nargs="+", required=True, help="trainers to compare with nnUNetTrainer")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per run, after a warm-up")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per trainer, alternating between trainers, each in a fresh process (medians)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("-o", default=None, help="also write the tables (markdown) here")
    args = parser.parse_args()
    from tqdm import tqdm
    trainers = [BASELINE, *args.trainers]
    runs: dict = {trainer: [] for trainer in trainers}
    for _, trainer in tqdm([(r, t) for r in range(args.rounds) for t in trainers], desc="runs"):
        runs[trainer].append(child(__file__, "pieces", args.d, args.c, args.p, trainer, str(args.steps), args.device))
    results = {trainer: median_run(trainer_runs) for trainer, trainer_runs in runs.items()}
    base = results[BASELINE]
    lines = [f"Dataset {args.d}, configuration {args.c}, plans {args.p}, device {args.device}: one synthetic batch "
             f"of the planned patch and batch size; FLOPs counted over one training step (forward, loss, backward, "
             f"optimiser); times the median over {args.rounds} alternating runs per trainer of each run's median of "
             f"{args.steps} steps after a warm-up.", "",
             "| trainer | GFLOP per step | FLOP ratio (floor) | s per step | time ratio | time ratio / FLOP ratio |",
             "|---|---|---|---|---|---|"]
    for trainer, result in results.items():
        if result is None:
            lines.append(f"| {trainer} | killed (out of memory) | | | | |")
            continue
        flop_ratio, time_ratio = result["total_flops"] / base["total_flops"], result["seconds"] / base["seconds"]
        lines.append(f"| {trainer} | {result['total_flops'] / 1e9:.1f} | {flop_ratio:.2f} | {result['seconds']:.2f} "
                     f"| {time_ratio:.2f} | {time_ratio / flop_ratio:.2f} |")
    lines.append("")
    for trainer, result in results.items():
        if result is not None:
            lines += piece_table(trainer, result)
    emit_table("\n".join(lines), args.o)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "pieces":
        prepare_child()
        arguments = sys.argv[2:]
        print(json.dumps(measure_pieces(*arguments[:4], int(arguments[4]), arguments[5])))
        sys.exit(0)
    sys.exit(main())
