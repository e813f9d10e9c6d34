import pytest

from detector.splits import stratified_group_split


def test_split_keeps_groups_whole_and_both_classes_in_val():
    labels, groups = [], []
    for g in range(40):  # each group: one human text and three machine continuations
        labels += [0, 1, 1, 1]
        groups += [f"g{g}"] * 4
    train, val = stratified_group_split(labels, groups, 0.25, seed=0)
    assert sorted(train + val) == list(range(160))
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val})
    assert len({groups[i] for i in val}) == 10
    assert {labels[i] for i in val} == {0, 1}


def test_split_without_groups_is_stratified_and_seeded():
    labels = [0] * 20 + [1] * 80
    train, val = stratified_group_split(labels, None, 0.1, seed=3)
    assert [labels[i] for i in val].count(0) == 2
    assert [labels[i] for i in val].count(1) == 8
    assert stratified_group_split(labels, None, 0.1, seed=3) == (train, val)
    assert stratified_group_split(labels, None, 0.1, seed=4) != (train, val)


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_group_split([0, 1], None, 1.0, 0)
