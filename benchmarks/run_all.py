"""`make bench`: every benchmark in turn (needs ../shared/data; about 4 hours on 2 CPU cores).

Each script writes bench_out/<name>/result.json (onnx_speed.py: bench_out/onnx_speed.json, about 20 minutes);
copy the figures into BENCHMARKS.md with date and machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[0].parent / "shared" / "data"


def main() -> int:
    if not SHARED.is_dir():
        print(f"benchmarks need the real data at {SHARED}; it is not there", file=sys.stderr)
        return 1
    status = 0
    scripts = (
        "oct_cpu.py",
        "oct_cross_source.py",  # train/ vs val/ of the shared OCT images, both ways
        "stas_cpu.py",
        "onnx_speed.py",  # needs stas_cpu's model
        "selftrain_stas.py",  # uses stas_cpu's split
        "selftrain_oct.py",
        "noisy_student_study.py",
    )
    for script in scripts:
        print(f"== {script}", flush=True)
        status |= subprocess.call([sys.executable, str(HERE / script), *sys.argv[1:]])
    return status


if __name__ == "__main__":
    sys.exit(main())
