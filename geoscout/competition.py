"""The competition's data format, defined once: view order, file and folder names, CSV columns.

Everything that reads or writes the competition layout (data, metric, synth, heads, report)
takes these names from here.
"""

from __future__ import annotations

VIEWS = ("north", "east", "south", "west")  # the order of a location's views everywhere in geoscout
NUM_VIEWS = len(VIEWS)
IMAGE_COLUMNS = tuple(f"image_{v}" for v in VIEWS)

TRAIN_CSV = "train_ground_truth.csv"
TEST_CSV = "sample_submission.csv"  # the test locations, and the template a submission fills
MAPPING_CSV = "state_mapping.csv"
# Not in the competition: the test split's truth, written by `geoscout synth` for local scoring.
TEST_TRUTH_CSV = "test_ground_truth.csv"
SPLITS = ("train", "test")
IMAGE_DIRS = {"train": "train_images", "test": "test_images"}
CSV_OF_SPLIT = {"train": TRAIN_CSV, "test": TEST_CSV}

LABEL_COLUMNS = ("state", "state_idx", "latitude", "longitude")
GROUND_TRUTH_COLUMNS = ("sample_id", *IMAGE_COLUMNS, *LABEL_COLUMNS)
TRUTH_COLUMNS = ("sample_id", "state_idx", "latitude", "longitude")  # what scoring needs of a truth file
PRED_STATE_COLUMNS = tuple(f"predicted_state_idx_{k}" for k in range(1, 6))
PRED_COORD_COLUMNS = ("predicted_latitude", "predicted_longitude")
SUBMISSION_COLUMNS = ("sample_id", *IMAGE_COLUMNS, *PRED_STATE_COLUMNS, *PRED_COORD_COLUMNS)
NO_PREDICTION = -1  # an empty top-5 slot
