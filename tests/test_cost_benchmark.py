"""benchmarks/cost_per_piece.py on a tiny phantom: the counted FLOPs of the pieces and of the rest add up to the
step's, the attention block is counted apart from its network, and the table reports the floor beside the time."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import planned_phantom_twins

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cost_per_piece.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return planned_phantom_twins(tmp_path_factory.mktemp("cost"), 920, 921)


def pieces(env, trainer):
    result = subprocess.run([sys.executable, SCRIPT, "pieces", "921", "2d", "nnUNetPlans", trainer, "1", "cpu"],
                            env=env, capture_output=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pieces_account_for_the_counted_step(workspace):
    _, env = workspace
    baseline, scribble = pieces(env, "nnUNetTrainer"), pieces(env, "ScribbleAttentionTrainer")
    # nnU-Net's step is its network's forward and backward: nothing left over but the element-wise loss
    assert baseline["pieces"] == ["planned network", "losses and the rest"]
    assert abs(baseline["flops"]["losses and the rest"]) < 1e-3 * baseline["total_flops"]
    block = "planned network: block after encoder stage 2"
    assert scribble["pieces"] == ["planned network", block, "losses and the rest"]
    # the same planned network, with the block counted apart, and the step's counted FLOPs are theirs
    assert scribble["flops"]["planned network"] == baseline["flops"]["planned network"]
    assert scribble["flops"][block] > 0
    assert scribble["total_flops"] == pytest.approx(baseline["total_flops"] + scribble["flops"][block], rel=0.01)


def test_the_table_puts_the_flop_ratio_beside_the_time_ratio(workspace, tmp_path):
    _, env = workspace
    output = tmp_path / "cost.md"
    result = subprocess.run([sys.executable, SCRIPT, "-d", "921", "--trainers", "ScribbleAttentionTrainer",
                             "--steps", "1", "--rounds", "1", "-o", output], env=env, capture_output=True,
                            encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stderr[-3000:]
    table = output.read_text(encoding="utf-8")
    header = next(line for line in table.splitlines() if line.startswith("| trainer |"))
    assert "FLOP ratio" in header and "time ratio" in header
    row = next(line for line in table.splitlines() if line.startswith("| ScribbleAttentionTrainer |"))
    cells = [float(cell) for cell in row.strip("|").split("|")[1:]]
    flop_ratio, time_ratio, quotient = cells[1], cells[3], cells[4]
    # the cells are rounded to 2 decimals, an error that the division scales with the ratios
    assert flop_ratio > 1 and quotient == pytest.approx(time_ratio / flop_ratio, rel=0.01, abs=0.02)
