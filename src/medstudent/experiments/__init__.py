"""Experiments over many trainings: cross-validation (`cv`), Optuna studies (`hpo`), long-format results."""
