"""Scoring and reporting, torch-free: `metrics` (Dice, IoU, classification metrics, bootstrap CIs), `scoring`
(the one scorer every entry point uses), `results` (the long results format), `evaluate`, `stats`
(`compare`) and `report` (figures).

Nothing is imported here so that `import medstudent.evaluation` stays cheap; import the submodules.
"""
