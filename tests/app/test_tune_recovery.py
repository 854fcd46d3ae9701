"""``tune`` recovers from what a crash or a user leaves in a study folder (issue 21 item 15):
a corrupt or non-file ``study.db`` is an error naming the file and what to do (exit 2, not a
raw SQLAlchemy traceback); a trial whose process was SIGKILLed (left RUNNING) is marked FAIL on
the next start, in the study and in ``trials.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from modalign.core.errors import UserInputError
from modalign.tune.budget import Budget
from modalign.tune.study import INTERRUPTED, _open_study, run_tune


@pytest.mark.parametrize("kind", ["folder", "garbage", "truncated"])
def test_a_broken_study_db_is_named_with_what_to_do(tmp_path: Path, kind: str) -> None:
    study = tmp_path / "study"
    study.mkdir()
    db = study / "study.db"
    if kind == "folder":
        db.mkdir()
    elif kind == "garbage":
        db.write_bytes(b"this is not a database\n" * 100)
    else:  # a real SQLite header, then nothing: torn by a crash or a bad copy
        db.write_bytes(b"SQLite format 3\x00" + b"\x10\x00\x01\x01" + b"\x00" * 80)
    with pytest.raises(UserInputError, match=r"study\.db") as err:
        run_tune("demo", Budget(trials=1), study)
    message = str(err.value)
    assert "move" in message and ("--study" in message or "backup" in message)


def test_a_killed_trial_is_marked_failed_on_the_next_start(tmp_path: Path) -> None:
    import optuna

    from modalign.tune.outputs import write_outputs

    study_dir = tmp_path / "study"
    study_dir.mkdir()
    url = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    first = optuna.create_study(study_name="finetune", storage=url, direction="maximize")
    done = first.ask()
    done.set_user_attr("config", {"finetune.lr": 0.001})
    first.tell(done, 0.5)
    killed = first.ask()  # what a SIGKILL mid-trial leaves: RUNNING forever
    killed.set_user_attr("config", {"finetune.lr": 0.01})
    assert first.trials[1].state == optuna.trial.TrialState.RUNNING

    study = _open_study("finetune", study_dir, "tpe", "median", 0, "subsets")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert study.trials[1].user_attrs["fail_reason"] == INTERRUPTED
    write_outputs(study, "demo", [], study_dir)
    with open(study_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL"]
