"""Trainers of the shipped models (torch: the `train` extra), on the project's simulation."""

# Every trainer draws its held-out data from the training seed plus these offsets,
# so no validation or test stack is ever one the model trained on.
VALIDATION_SEED_OFFSET = 20_000  # chooses thresholds and decoder settings
TEST_SEED_OFFSET = 10_000  # scores the model card
