import numpy as np
import pytest

from geoscout.store.split import load_validation_split, make_validation_split, save_validation_split, validation_digest
from geoscout.testing import make_planted_features


def test_split_is_stratified_seeded_and_keeps_a_training_row_per_class():
    class_id = np.repeat(np.arange(5), [100, 40, 10, 2, 1])
    mask = make_validation_split(class_id, 0.2, 7)
    assert mask.dtype == bool and mask.shape == class_id.shape
    assert [int(mask[class_id == c].sum()) for c in range(5)] == [20, 8, 2, 0, 0]
    assert all((~mask[class_id == c]).any() for c in range(5))
    assert np.array_equal(mask, make_validation_split(class_id, 0.2, 7))
    assert not np.array_equal(mask, make_validation_split(class_id, 0.2, 8))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="fraction"):
        make_validation_split(np.zeros(10, dtype=np.int64), fraction, 0)


def test_split_file_round_trip_and_refusals(tmp_path):
    features = make_planted_features(n=120)
    mask = make_validation_split(features.class_id, 0.25, 3)
    path = tmp_path / "split.json"
    save_validation_split(path, features=features, mask=mask, fraction=0.25, seed=3)
    assert np.array_equal(load_validation_split(path, features), mask)
    assert validation_digest(features.sample_id[mask]) == validation_digest(features.sample_id[mask][::-1])

    other = make_planted_features(n=120, dataset_fingerprint="another-dataset")
    with pytest.raises(ValueError, match="another-dataset"):
        load_validation_split(path, other)
    with pytest.raises(ValueError, match="rows"):
        load_validation_split(path, features.subset(np.arange(100)))
