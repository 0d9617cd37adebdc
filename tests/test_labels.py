"""Tests of pgd_deploy.labels: the one rule for class names and category ids."""

from __future__ import annotations

from pgd_deploy.labels import class_labels


def test_stored_labels_are_kept() -> None:
    assert class_labels(2, ["cat", "dog"], [17, 18]) == (["cat", "dog"], [17, 18])


def test_missing_names_and_ids_get_the_defaults() -> None:
    assert class_labels(3) == (["0", "1", "2"], [1, 2, 3])
    assert class_labels(3, [], []) == (["0", "1", "2"], [1, 2, 3])
    # ids default from the names when there are names (label + 1), whatever the count says
    assert class_labels(0, ["a", "b"], None) == (["a", "b"], [1, 2])
    assert class_labels(0, None, None) == ([], [])


def test_results_are_fresh_lists() -> None:
    names, ids = ("a", "b"), (4, 5)
    got_names, got_ids = class_labels(2, names, ids)
    assert got_names == ["a", "b"] and got_ids == [4, 5]
    assert isinstance(got_names, list) and isinstance(got_ids, list)
