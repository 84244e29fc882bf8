import numpy as np
import pytest

from nnunet_weak.errors import UserInputError
from nnunet_weak.phantom import generate_case
from nnunet_weak.supervision_choice import LabelledSelection, SupervisionChoice

CASES = [f"case_{i:02d}" for i in range(10)]
IGNORE = 4


@pytest.fixture(scope="module")
def dense():
    return generate_case(3, shape_yx=(32, 32)).label


def test_selection_by_count_follows_the_given_order():
    order = ["case_07", "case_03", "case_09", "case_01"]
    assert LabelledSelection(count=2, order=order).select(CASES, 0) == ["case_03", "case_07"]
    assert LabelledSelection(count=3).select(CASES, 0) == CASES[:3]


def test_selection_by_list_and_by_seeded_fraction():
    assert LabelledSelection(cases=["case_05", "case_02"]).select(CASES, 0) == ["case_02", "case_05"]
    a = LabelledSelection(fraction=0.3).select(CASES, 1)
    assert len(a) == 3 and a == LabelledSelection(fraction=0.3).select(CASES, 1)
    assert len({tuple(LabelledSelection(fraction=0.3).select(CASES, seed)) for seed in range(5)}) > 1


@pytest.mark.parametrize("selection, message", [
    (LabelledSelection(count=11), "11 labelled cases requested"),
    (LabelledSelection(cases=["nope"]), "not training cases"),
    (LabelledSelection(fraction=1.5), "fraction"),
    (LabelledSelection(count=2, fraction=0.5), "exactly one"),
])
def test_bad_selections(selection, message):
    with pytest.raises(UserInputError, match=message):
        selection.select(CASES, 0)


def test_semi_needs_a_selection_and_modes_are_checked():
    with pytest.raises(UserInputError, match="keep labels"):
        SupervisionChoice("semi")
    with pytest.raises(UserInputError, match="Unknown supervision"):
        SupervisionChoice("partial")
    with pytest.raises(UserInputError, match="Unknown weak label"):
        SupervisionChoice("weak", weak_label="polygon")


def test_semi_supervision(dense):
    choice = SupervisionChoice("semi", selection=LabelledSelection(count=2))
    keep = choice.cases_keeping_dense_labels(CASES)
    assert keep == CASES[:2]
    label, kind, _, _ = choice.make_label("case_00", dense, IGNORE, True)
    assert kind == "dense" and label is dense
    label, kind, _, _ = choice.make_label("case_05", dense, IGNORE, False)
    assert kind == "unlabelled" and np.all(label == IGNORE)


@pytest.mark.parametrize("weak_label", ["scribble", "erosion", "box", "disc"])
def test_mixed_supervision_weak_labels_agree_with_dense(dense, weak_label):
    choice = SupervisionChoice("mixed", weak_label=weak_label, selection=LabelledSelection(fraction=0.2), seed=4)
    label, kind, name, provenance = choice.make_label("case_03", dense, IGNORE, False)
    assert kind == "sparse" and name == weak_label and provenance["generator"] == weak_label
    annotated = label != IGNORE
    assert annotated.any() and (~annotated).any()
    if weak_label != "box":  # a box label calls background what lies outside every box
        np.testing.assert_array_equal(label[annotated], dense[annotated])
    else:
        assert not np.any((label == 0) & (dense > 0))
    again, *_ = choice.make_label("case_03", dense, IGNORE, False)
    np.testing.assert_array_equal(label, again)


def test_real_scribbles_win_over_simulated(dense):
    real = np.full(dense.shape, IGNORE, np.uint8)
    real[0, 0, 0] = 0
    label, kind, name, provenance = SupervisionChoice("weak").make_label("c", dense, IGNORE, False, real)
    assert label is not None and np.array_equal(label, real) and provenance == {"source": "hand-drawn"}
    label, *_ = SupervisionChoice("weak", weak_label="erosion").make_label("c", dense, IGNORE, False, real)
    assert not np.array_equal(label, real)
    label, _, _, provenance = SupervisionChoice("weak", use_real_scribbles=False).make_label("c", dense, IGNORE,
                                                                                             False, real)
    assert not np.array_equal(label, real) and provenance["generator"] == "scribble"
