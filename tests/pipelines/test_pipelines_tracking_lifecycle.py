"""MLflow run lifecycle of ``moekit <app> fit``: unique run names under one seed, a resumed fit (and a test of
its checkpoint) continuing the run that wrote the checkpoint, a fit stopped by SIGTERM ending KILLED, a
failure before training ending FAILED with the error, and a run left open at process exit marked FAILED.

What is covered of "killed": a real SIGTERM delivered to the fitting process (Lightning turns it into an
exception at the next batch). SIGKILL cannot be observed by the process; its run stays RUNNING until resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient

from pipelines.cli import main
from pipelines.lightning_cli import MoekitCLI
from pipelines.tracking import RUN_ID_KEY, checkpoint_run_id


def _runs(uri: str, experiment: str = "moekit-toy"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _fit(toy_config: Path, run_dir: Path, *extra: str) -> None:
    main(["toy", "fit", "--config", str(toy_config), f"--run_dir={run_dir}", *extra])


def test_runs_with_the_same_seed_get_distinct_names(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    for name in ("a", "b"):  # both seed_everything: 0
        _fit(toy_config, tmp_path / name, "--trainer.max_epochs=1")
    names = [r.info.run_name for r in _runs(tracking_uri)]
    assert len(names) == 2 and names[0] != names[1]
    assert all(n.startswith("toy-toy-") for n in names)  # <app>-<config stem>-<time>-<hex>


def test_resumed_fit_and_test_continue_the_checkpoint_run(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    _fit(toy_config, tmp_path / "ck", "--trainer.max_epochs=2")
    ckpt = tmp_path / "ck" / "last.ckpt"
    (first,) = _runs(tracking_uri)
    assert torch.load(ckpt, weights_only=False)[RUN_ID_KEY] == first.info.run_id
    assert checkpoint_run_id("last", tmp_path / "ck") == first.info.run_id
    _fit(toy_config, tmp_path / "ck", "--trainer.max_epochs=4", "--ckpt_path", "last")
    main(
        ["toy", "test", "--config", str(toy_config), f"--run_dir={tmp_path / 'ck'}", "--ckpt_path", str(ckpt)]
    )

    (run,) = _runs(tracking_uri)  # no second run
    assert run.info.run_id == first.info.run_id
    assert run.info.status == "FINISHED"
    hist = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "val/auc")
    assert len(hist) == 4  # 2 epochs before the resume, 2 after
    assert "test/auc" in run.data.metrics
    assert run.data.tags["moekit.checkpoint_dir"] == str(tmp_path / "ck")
    assert Path(run.data.tags["moekit.checkpoint.last"]) == ckpt.resolve()


def test_checkpoint_from_another_store_is_tested_in_a_new_run(
    tmp_path: Path, toy_config: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A checkpoint copied from another machine names a run that this store lacks: ``test`` warns and logs
    to a new run instead of failing with MLflow's "Run with id=... not found"."""
    _fit(toy_config, tmp_path / "ck", "--trainer.max_epochs=1")
    ckpt = tmp_path / "ck" / "last.ckpt"
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    with caplog.at_level("WARNING", logger="pipelines.tracking"):
        main(["toy", "test", "--config", str(toy_config), f"--run_dir={tmp_path / 'ck'}",
              "--ckpt_path", str(ckpt)])  # fmt: skip
    assert "is not in" in caplog.text and "logging to a new run" in caplog.text
    (run,) = _runs(other)
    assert run.info.status == "FINISHED" and "test/auc" in run.data.metrics
    (first,) = _runs(tracking_uri)
    assert run.info.run_id != first.info.run_id


class _Raise(Callback):
    """Fails the fit before training (at setup) or, with ``sigterm``, sends SIGTERM to this process at the
    second training batch."""

    def __init__(self, *, sigterm: bool = False) -> None:
        self.sigterm = sigterm

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.sigterm:
            raise RuntimeError("no data for split 'val'")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        if self.sigterm and batch_idx == 1:
            # Lightning has its handler installed during fit; never let a default handler kill pytest
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGTERM)


def test_failure_before_training_ends_failed_with_the_error(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    cli = MoekitCLI(
        app="toy",
        args=["--config", str(toy_config), f"--run_dir={tmp_path / 'ck'}"],
        run=False,
        extra_callbacks=[_Raise()],
    )
    with pytest.raises(RuntimeError, match="no data"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (run,) = _runs(tracking_uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: no data for split 'val'"


def test_sigterm_during_fit_ends_killed(tmp_path: Path, toy_config: Path, tracking_uri: str) -> None:
    cli = MoekitCLI(
        app="toy",
        args=["--config", str(toy_config), f"--run_dir={tmp_path / 'ck'}"],
        run=False,
        extra_callbacks=[_Raise(sigterm=True)],
    )
    with pytest.raises(SystemExit):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (run,) = _runs(tracking_uri)
    assert run.info.status == "KILLED"
    assert "error" not in run.data.tags


def test_run_left_open_at_exit_is_marked_failed(tracking_uri: str) -> None:
    code = (
        "from pipelines.tracking import make_logger\n"
        f"lg = make_logger(app='toy', tracking_uri={tracking_uri!r})\n"
        "lg.log_metrics({'x': 1.0}, step=0)\n"
        "raise SystemExit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    (run,) = _runs(tracking_uri)
    assert run.data.metrics["x"] == 1.0
    assert run.info.status == "FAILED"


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


class _AppObject:
    def __init__(self, v: int) -> None:
        self.v = v


class _EvilTorch(_Evil):
    def __reduce__(self):  # noqa: ANN204 - a torch function is no more allowed than any other
        return (torch.save, ({}, str(self.marker)))


def test_run_id_is_read_without_running_the_checkpoint_pickle(tmp_path: Path) -> None:
    """A checkpoint holding Python objects (as the apps' do) gives its run id through torch's weights-only
    unpickler with the objects replaced by placeholders; a hostile one runs nothing."""
    marker = tmp_path / "ran"
    ckpt = {
        "state_dict": {"w": torch.ones(2)},
        RUN_ID_KEY: "abc123",
        "obj": _AppObject(3),
        "obj2": _EvilTorch(tmp_path / "ran2"),  # a torch function: replaced, not called
    }
    torch.save(ckpt, tmp_path / "x.ckpt")
    assert checkpoint_run_id(tmp_path / "x.ckpt") == "abc123"
    assert not (tmp_path / "ran2").exists()
    # os.system is in a module torch blocks outright: no run id, and nothing ran
    torch.save({**ckpt, "obj3": _Evil(marker)}, tmp_path / "evil.ckpt")
    assert checkpoint_run_id(tmp_path / "evil.ckpt") is None
    assert not marker.exists()
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")
    assert checkpoint_run_id(tmp_path / "old.ckpt") is None  # written before run ids were stored
    assert checkpoint_run_id("best", tmp_path) is None


def test_failed_test_keeps_the_finished_fit_run_finished(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    """New-user trial: a predict that failed on a wrong data file marked the (successful) training run it
    reopened FAILED (the source of a registered model). It now stays FINISHED with moekit.last_error."""
    _fit(toy_config, tmp_path / "ck", "--trainer.max_epochs=1")
    (fit_run,) = _runs(tracking_uri)
    assert fit_run.info.status == "FINISHED"
    args = ["test", "--config", str(toy_config), f"--run_dir={tmp_path / 'ck'}", "--ckpt_path",
            str(tmp_path / "ck" / "last.ckpt")]  # fmt: skip
    with pytest.raises(RuntimeError, match="no data"):  # fails at the data setup of the test
        MoekitCLI(app="toy", args=args, extra_callbacks=[_Raise()])
    (run,) = _runs(tracking_uri)
    assert run.info.run_id == fit_run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["moekit.last_error"] == "test: RuntimeError: no data for split 'val'"
    assert "error" not in run.data.tags
