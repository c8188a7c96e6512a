"""Metrics (`medstudent.evaluation.metrics`) and plots (`medstudent.evaluation.report`), torch-free.

Nothing is imported here so that `import medstudent.evaluation` stays cheap; import the submodules.
"""
