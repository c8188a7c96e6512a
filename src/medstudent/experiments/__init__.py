"""Experiments over many trainings: cross-validation (`cv`, with `manifest` and `parallel`) and Optuna
studies (`hpo`, `search_space`); their results go to the long format of `medstudent.evaluation.results`."""
