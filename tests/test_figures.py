"""The figures people look at: drawn, readable, naming what they show."""
import matplotlib.image
import numpy as np

from nnunet_weak.compare import dice_chart_figure
from nnunet_weak.plots import CaseOverlay, case_overlay_figure, paired_difference_figure, save_figure_atomic

CLASSES = {"RV": 1, "MYO": 2, "LV": 3}
METHODS = ["nnU-Net + partial loss", "ScribbleAttentionTrainer", "ScribbleAttentionTrainer (crf_rampup=0)"]


def unwrapped(text):
    """A label as written before textwrap broke it into lines."""
    return " ".join(text.get_text().split("\n"))


def test_case_overlay_names_every_method_and_class(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.zeros((20, 24), int)
    truth[5:10, 5:10], truth[10:14, 8:16], truth[14:18, 4:9] = 1, 2, 3
    cases = [CaseOverlay(f"case {k}: the baseline's {rank} mean Dice", rng.random((20, 24)), truth,
                         {m: np.roll(truth, k + i, axis=1) for i, m in enumerate(METHODS)})
             for k, rank in enumerate(["median", "lowest"])]
    figure = case_overlay_figure(cases, CLASSES)
    assert len(figure.axes) == 2 * (2 + len(METHODS))
    titles = [unwrapped(axis.title) for axis in figure.axes]
    assert titles == 2 * ["image", "dense truth", *METHODS]
    assert "the baseline's lowest mean Dice" in unwrapped(figure.axes[len(METHODS) + 2].yaxis.label)
    assert [t.get_text() for t in figure.legends[0].get_texts()] == list(CLASSES)
    width, height = figure.get_size_inches() * 100
    save_figure_atomic(figure, tmp_path / "cases.png", dpi=100)
    pixels = matplotlib.image.imread(tmp_path / "cases.png")
    assert pixels.shape[:2] == (round(height), round(width))
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_paired_difference_figure_has_one_box_per_method_and_split():
    differences = {split: {m: list(np.linspace(-0.1, 0.2, 7) + i) for i, m in enumerate(METHODS[1:])}
                   for split in ("validation", "test")}
    figure = paired_difference_figure(differences, "mean Dice", METHODS[0])
    assert [axis.get_title() for axis in figure.axes] == ["validation cases", "test cases"]
    for axis in figure.axes:
        assert [unwrapped(t) for t in axis.get_xticklabels()] == METHODS[1:]
        assert sum(len(c.get_offsets()) for c in axis.collections) == 7 * len(METHODS[1:])
    assert METHODS[0] in figure._suptitle.get_text().replace("\n", " ")


def test_dice_chart_title_stays_inside_the_figure():
    rows = [{"method": m, **{f"Dice {c}": 0.5 for c in [*CLASSES, "mean"]}} for m in METHODS[:2]]
    caption = "40 held-out test cases of Dataset027_ACDC, scored on dense labels; " * 4
    figure = dice_chart_figure(rows, CLASSES, caption)
    figure.canvas.draw()
    extent = figure.axes[0].title.get_window_extent()
    assert extent.x0 >= 0 and extent.x1 <= figure.bbox.x1 and extent.y1 <= figure.bbox.y1
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == METHODS[:2]
