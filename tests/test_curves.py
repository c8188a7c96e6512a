"""training_curves.png of a `--fold all` run (no validation): every panel is titled by what it plots."""

from __future__ import annotations

import pandas as pd

import medstudent.training.curves as curves


def test_fold_all_curves_have_no_metric_panel(tmp_path, monkeypatch):
    # what Lightning's CSVLogger writes for --fold all: step rows (loss) and epoch rows (policy, lr), no val_
    rows = []
    for epoch in range(3):
        rows += [
            {"epoch": epoch, "step": 2 * epoch + k, "train_loss_step": 1.0 / (epoch + k + 1)} for k in (0, 1)
        ]
        rows.append(
            {
                "epoch": epoch,
                "step": 2 * epoch + 1,
                "train_loss_epoch": 0.5,
                "aug_policy_prob": 0.8 - 0.2 * epoch,
                "lr": 1e-3,
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    drawn = []
    save = curves.save_figure
    monkeypatch.setattr(curves, "save_figure", lambda fig, path: drawn.append(fig) or save(fig, path))
    assert curves.training_curves_png(tmp_path / "metrics.csv", tmp_path / "training_curves.png").is_file()
    panels = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in drawn[0].axes}
    assert panels == {
        "loss": ["train_loss_epoch"],
        "augmentation policy probability": ["aug_policy_prob"],
        "learning rate": ["lr"],
    }
