"""The records of a self-training run: selftrain.json (state after every stage, what --resume continues
from) and the summary files (summary.csv/.md, results.csv and test_results.csv for `compare`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medstudent.atomic import write_text_atomic
from medstudent.config import RunConfig
from medstudent.distributed import is_main
from medstudent.errors import DataError
from medstudent.evaluation.results import primary_metric, write_results
from medstudent.selftrain.pseudo_io import write_csv

STATE_FORMAT = "medstudent-selftrain/1"
STATE_FILE = "selftrain.json"


class State:
    """selftrain.json: one record per round, written after every finished stage."""

    def __init__(self, path: Path):
        self.path = path
        self.doc: dict[str, Any] = {"format": STATE_FORMAT, "rounds": {}}
        if path.is_file():
            try:
                self.doc = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(path, f"not valid JSON ({e}); delete it to start over") from e
            if self.doc.get("format") != STATE_FORMAT:
                raise DataError(path, "not a medstudent self-training state file")

    def round(self, r: int) -> dict[str, Any]:
        return self.doc["rounds"].setdefault(str(r), {"round": r})

    def save(self) -> None:
        if not is_main():
            return
        write_text_atomic(self.path, json.dumps(self.doc, indent=1))  # a kill never leaves half a state


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def round_line(rec: dict) -> str:
    return (
        f"round {rec['round']} ({rec.get('role')}): val {rec.get('metric')} {_fmt(rec.get('val_metric'))}, "
        f"test {_fmt(rec.get('test_metric'))}"
    )


SUMMARY_FIELDS = [
    "round", "role", "arch", "encoder", "members", "pseudo_predicted", "pseudo_kept", "pseudo_quality",
    "confident_fraction", "val_metric", "test_metric", "gate", "minutes",
]  # fmt: skip


def write_summary(root: Path, state: State, cfg: RunConfig) -> dict[str, Any]:
    """summary.csv/.md (teacher vs students) and results.csv in the long format `compare` reads."""
    rows, recs = [], []
    for key in sorted(state.doc["rounds"], key=int):
        rec = state.doc["rounds"][key]
        if "val_metric" not in rec:
            continue
        recs.append(rec)
        ps = rec.get("pseudo", {})
        quality = ps.get("pseudo_precision", ps.get("pseudo_dice"))
        rows.append({
            "round": rec["round"], "role": rec.get("role"), "arch": rec.get("arch"),
            "encoder": rec.get("encoder"), "members": rec.get("members"),
            "pseudo_predicted": ps.get("predicted"), "pseudo_kept": ps.get("kept"),
            "pseudo_quality": quality, "confident_fraction": ps.get("kept_mean_confident_fraction"),
            "val_metric": rec.get("val_metric"), "test_metric": rec.get("test_metric"),
            "gate": rec.get("gate", "teacher" if rec["round"] == 0 else ""), "minutes": rec.get("minutes"),
        })  # fmt: skip
    best = state.doc.get("best_round")
    best_dirs = state.doc["rounds"].get(str(best), {}).get("dirs", []) if best is not None else []
    summary = {"root": str(root), "rounds": rows, "best_round": best, "best_dirs": best_dirs}
    if not is_main():
        return summary
    write_csv(root / "summary.csv", rows, fields=SUMMARY_FIELDS)
    lines = ["| " + " | ".join(SUMMARY_FIELDS) + " |", "|" + "---|" * len(SUMMARY_FIELDS)]
    lines += ["| " + " | ".join(_fmt(r.get(f)) for f in SUMMARY_FIELDS) + " |" for r in rows]
    write_text_atomic(root / "summary.md", "\n".join(lines) + "\n")
    metric = primary_metric(cfg.data.task)  # mean_dice | accuracy, as `cv` writes them
    dataset = Path(cfg.data.root).resolve().name
    for split_name, fname in (("val", "results.csv"), ("test", "test_results.csv")):
        # the primary metric first, then the round's other scores (mean_dice_raw, pooled_dice, ...)
        rows_out = [
            {
                "dataset": dataset,
                "method": r["role"],
                "fold": cfg.data.fold,
                metric: r[f"{split_name}_metric"],
                **(rec.get(f"{split_name}_scores") or {}),
            }
            for r, rec in zip(rows, recs, strict=True)
            if r[f"{split_name}_metric"] is not None
        ]
        if rows_out:
            write_results(rows_out, root / fname)
    return summary
