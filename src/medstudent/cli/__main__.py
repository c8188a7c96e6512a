"""`python -m medstudent.cli`: the same commands as the `medstudent` script."""

from medstudent.cli import app

app()
