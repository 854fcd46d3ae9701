"""``--json`` keeps its contract (issue 21 item 13): exactly one strict JSON object on stdout,
also when the command fails (``{"error": ..., "exit_code": ...}``) and when a number is not
finite (``null``, never ``NaN``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modalign.cli import main

from helpers.corpus import tiny_overrides, write_tiny_corpus


def _strict(text: str) -> Any:
    """Parse one JSON document refusing NaN/Infinity (what RFC 8259 parsers do)."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    lines = text.strip().splitlines()
    assert len(lines) == 1, text  # exactly one object
    return json.loads(lines[0], parse_constant=refuse)


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_a_config_error_prints_one_error_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "pretrain", "demo", "--json", "--set", "model.embed_dim=0"]) == 2
    out = _strict(capsys.readouterr().out)
    assert out["exit_code"] == 2 and "model.embed_dim" in out["error"]


def test_a_usage_error_prints_one_error_object(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "demo", "--json", "--no-such-flag"])
    assert exc.value.code == 2
    out = _strict(capsys.readouterr().out)
    assert out["exit_code"] == 2 and "--no-such-flag" in out["error"]


@pytest.mark.slow  # two tiny training runs
def test_resuming_a_finished_run_prints_strict_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_tiny_corpus(tmp_path / "c", n=8)
    sets = _sets(
        [*tiny_overrides(manifest, tmp_path / "run", steps=1), "model.modalities=[image,audio]"]
    )
    assert main(["-q", "pretrain", "demo", "--json", *sets]) == 0
    first = _strict(capsys.readouterr().out)
    assert main(["-q", "pretrain", "demo", "--json", "--resume", "latest", *sets]) == 0
    again = _strict(capsys.readouterr().out)  # no step ran: no NaN, null or the real loss
    assert again["final_loss"] is None or again["final_loss"] == first["final_loss"]
