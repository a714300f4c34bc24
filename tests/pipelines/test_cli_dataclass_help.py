"""``--<key>.<arg>.help`` for an argument inside a class-typed key (issue 17): jsonargparse refuses
``--model.config.help`` ("ignored explicit argument 'LMConfig'"); moekit prints the argument's class help.

Oracle: the classes themselves. Every field of ``LMConfig`` (``dataclasses.fields``) appears as an option with
its default and the first words of its docstring help; ``--model.model.help MIGA`` lists MIGA's ``__init__``
parameters; a wrong class name is a usage error naming the right type; ``--trainer.callbacks.help`` (not
inside a subclass key) is still jsonargparse's own."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from apps.finance.model import MIGA
from apps.lm.model import LMConfig
from pipelines.cli import main

TINY = Path(__file__).resolve().parents[2] / "apps" / "lm" / "configs" / "tiny.yaml"


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


@pytest.mark.parametrize(
    "ask",
    [
        ["--model.config.help"],
        ["--model.config.help", "LMConfig"],
        ["--model.config.help=apps.lm.model.LMConfig"],
        ["--config", str(TINY), "--model.config.help", "LMConfig"],
    ],
)
def test_lm_config_help_lists_every_field(ask: list[str], capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(["lm", "fit", *ask], capsys)
    assert code == 0, err
    assert "Help for --model.config.help=apps.lm.model.LMConfig" in out
    text = " ".join(out.split())  # argparse wraps lines
    for f in dataclasses.fields(LMConfig):
        assert f"--model.config.{f.name} " in text, f.name
    assert "--model.config.n_layers N_LAYERS transformer blocks. (type: int, default: 4)" in text
    assert f"(type: int, default: {LMConfig().dim})" in text


def test_subclass_argument_help_names_its_init_arguments(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(["finance", "fit", "--model.model.help", "MIGA"], capsys)
    assert code == 0, err
    names = [p for p in inspect.signature(MIGA.__init__).parameters if p != "self"]
    assert names and all(f"--model.model.{n} " in " ".join(out.split()) for n in names)


def test_wrong_class_is_a_usage_error_naming_the_type(capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(["lm", "fit", "--model.config.help", "NotAConfig"], capsys)
    assert code == 2
    assert "--model.config is typed apps.lm.model.LMConfig" in err


def test_plain_key_help_stays_jsonargparse(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(["lm", "fit", "--trainer.callbacks.help", "ModelCheckpoint"], capsys)
    assert code == 0, err
    assert "--trainer.callbacks.dirpath" in out
