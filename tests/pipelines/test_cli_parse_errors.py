"""A mistake in a config or on the command line ends in one ``error:`` line (exit status 2): jsonargparse's
report of a misspelt key was the whole usage plus a nested Union report (65 lines in a new-user trial, the
key buried inside), and a class refusing its arguments printed a Namespace dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.lightning_cli import condense_parse_error


def _error(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_misspelt_config_key_is_one_line_naming_it(
    tmp_path: Path, toy_config: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(toy_config.read_text().replace("n_samples: 512", "n_sample: 512"))
    line = _error(capsys, "toy", "fit", "--config", str(bad))
    assert line == (
        "error: moekit toy fit: --data (toy_app.ToyDataModule): unknown option(s) ['n_sample']; "
        "`moekit toy fit --data.help toy_app.ToyDataModule` lists the accepted ones"
    )


def test_wrong_value_type_is_one_line_naming_key_and_value(
    toy_config: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    line = _error(capsys, "toy", "fit", "--config", str(toy_config), "--trainer.max_epochs", "abc")
    assert line == "error: moekit toy fit: --trainer.max_epochs: Expected a <class 'int'> given abc"
    line = _error(capsys, "toy", "fit", "--config", str(toy_config), "--model.init_args.lr", "abc")
    assert "--lr: Expected a <class 'float'>. Got value: abc" in line and "NestedArg" not in line


def test_class_refusing_its_arguments_is_one_line(tracking_uri: str, capsys: pytest.CaptureFixture) -> None:
    toy = Path(__file__).resolve().parents[2] / "apps" / "recsys" / "examples" / "toy.yaml"
    line = _error(capsys, "recsys", "fit", "--config", str(toy), "--data.init_args.val_fraction", "2")
    assert line.startswith("error: moekit recsys fit: val_fraction must be in (0, 1), got 2")
    assert "Namespace(" not in line and "Union" not in line


def test_condense_keeps_an_unknown_message() -> None:
    assert condense_parse_error("something odd\n  happened", "moekit x fit") == "something odd happened"
