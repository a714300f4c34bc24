"""pipelines.checkpointing: atomic saves under kill -9, safe loading, incomplete files and app stamps named.

Each test fails with Lightning's default ``TorchCheckpointIO`` in place of ``AtomicCheckpointIO``: no stamp,
``weights_only=False`` honoured (the crafted pickle runs), a bare ``EOFError``/``RuntimeError`` for cut files,
a foreign checkpoint restored, and, with ``$TMPDIR`` on another filesystem, a truncated ``last.ckpt`` after
``kill -9`` (``ckpt_kill_writer.py ... plain``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipelines.checkpointing import (
    CHECKPOINT_KEY,
    SCHEMA_VERSION,
    AtomicCheckpointIO,
    ForeignCheckpointError,
    IncompleteCheckpointError,
    NotMoekitCheckpointError,
    UnsafeCheckpointError,
    atomic_save,
    load_checkpoint_file,
    remove_stale_temporaries,
    stamp,
    stamp_checkpoint_file,
    temporary_path,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201 - Lightning hook
        x, y = batch
        return nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning hook
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LoadSpy(Callback):
    """Records whether Lightning got as far as handing the checkpoint to the callbacks."""

    def __init__(self) -> None:
        self.loaded = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # noqa: ANN001
        self.loaded = True


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(-1)), batch_size=8)


def _trainer(ckpt_dir: Path, io, *, max_steps: int = 8, callbacks=()) -> L.Trainer:  # noqa: ANN001
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[io],
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True), *callbacks],
    )


def _fit(ckpt_dir: Path, io, **kw) -> Path:  # noqa: ANN001
    _trainer(ckpt_dir, io, **kw).fit(TinyModule(), train_dataloaders=_data())
    return ckpt_dir / "last.ckpt"


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture
def tmpdir_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$TMPDIR`` on another filesystem than ``tmp_path`` if one exists (/dev/shm), else another folder."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else tmp_path
    folder = Path(tempfile.mkdtemp(prefix="moekit-tmpdir-", dir=base))
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR in this process too
    yield folder
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


def test_fit_saves_stamped_atomic_checkpoints_and_resumes(tmp_path: Path, tmpdir_elsewhere: Path) -> None:
    last = _fit(tmp_path / "ckpt", AtomicCheckpointIO(app="toy"), max_steps=4)
    ck = torch.load(last, weights_only=True)
    assert ck[CHECKPOINT_KEY] == {"app": "toy", "schema": SCHEMA_VERSION}
    assert ck["global_step"] == 4
    assert _temporaries(tmp_path / "ckpt") == [] and list(tmpdir_elsewhere.iterdir()) == []

    trainer = _trainer(tmp_path / "ckpt", AtomicCheckpointIO(app="toy"), max_steps=8)
    trainer.fit(TinyModule(), train_dataloaders=_data(), ckpt_path=last)
    assert trainer.global_step == 8
    assert torch.load(last, weights_only=True)["global_step"] == 8


def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # noqa: ANN204 - pickle protocol
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad.ckpt"
    good = torch.load(_fit(tmp_path / "ckpt", AtomicCheckpointIO(app="toy")), weights_only=True)
    torch.save({**stamp(good, "toy"), "hyper_parameters": {"x": Exploit()}}, bad)

    spy = LoadSpy()
    trainer = _trainer(tmp_path / "ckpt2", AtomicCheckpointIO(app="toy"), callbacks=[spy])
    with pytest.raises(UnsafeCheckpointError) as err:
        # weights_only=False (the CLI's old default) must not open the door
        trainer.fit(TinyModule(), train_dataloaders=_data(), ckpt_path=bad, weights_only=False)
    assert str(bad) in str(err.value) and "posix.system" in str(err.value)
    assert not marker.exists() and not spy.loaded
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(bad, app="toy")
    assert not marker.exists()


def test_allow_list_admits_the_apps_own_types(tmp_path: Path) -> None:
    from apps.lm.model import LMConfig  # registers itself with add_safe_globals on import

    path = tmp_path / "lm.ckpt"
    atomic_save(stamp({"state_dict": {}, "hyper_parameters": {"config": LMConfig(vocab_size=7)}}, "lm"), path)
    assert load_checkpoint_file(path, app="lm")["hyper_parameters"]["config"].vocab_size == 7
    # without the global registration the caller's allow-list is what admits it
    saved = list(torch.serialization.get_safe_globals())
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(UnsafeCheckpointError, match=r"apps\.lm\.model\.LMConfig"):
            load_checkpoint_file(path, app="lm")
        assert load_checkpoint_file(path, app="lm", safe_globals=[LMConfig])["hyper_parameters"]
    finally:
        torch.serialization.add_safe_globals(saved)


@pytest.mark.parametrize("keep", [0, 3, 100, "half"])
def test_empty_or_truncated_checkpoint_is_named_incomplete(tmp_path: Path, keep: int | str) -> None:
    last = _fit(tmp_path / "ckpt", AtomicCheckpointIO(app="toy"))
    data = last.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2 if keep == "half" else keep])

    spy = LoadSpy()
    trainer = _trainer(tmp_path / "ckpt2", AtomicCheckpointIO(app="toy"), callbacks=[spy])
    with pytest.raises(IncompleteCheckpointError) as err:
        trainer.fit(TinyModule(), train_dataloaders=_data(), ckpt_path=cut)
    assert str(cut) in str(err.value) and "incomplete" in str(err.value)
    assert not spy.loaded


def test_checkpoint_of_another_app_is_refused_before_any_state_is_restored(tmp_path: Path) -> None:
    foreign = _fit(tmp_path / "recsys", AtomicCheckpointIO(app="recsys"))
    spy = LoadSpy()
    model = TinyModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path / "lm", AtomicCheckpointIO(app="lm"), callbacks=[spy])
    with pytest.raises(ForeignCheckpointError) as err:
        trainer.fit(model, train_dataloaders=_data(), ckpt_path=foreign)
    msg = str(err.value)
    assert str(foreign) in msg and "'recsys'" in msg and "'lm'" in msg
    assert not spy.loaded and trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.ckpt"
    atomic_save({"state_dict": {}, CHECKPOINT_KEY: {"app": "toy", "schema": SCHEMA_VERSION + 1}}, path)
    with pytest.raises(ForeignCheckpointError, match="schema"):
        load_checkpoint_file(path, app="toy")


def test_checkpoint_not_from_moekit_is_refused_and_can_be_stamped_once(tmp_path: Path) -> None:
    plain = _fit(tmp_path / "plain", TorchCheckpointIO())
    spy = LoadSpy()
    trainer = _trainer(tmp_path / "ckpt", AtomicCheckpointIO(app="toy"), callbacks=[spy])
    with pytest.raises(NotMoekitCheckpointError) as err:
        trainer.fit(TinyModule(), train_dataloaders=_data(), ckpt_path=plain)
    assert str(plain) in str(err.value) and "not a moekit checkpoint" in str(err.value)
    assert not spy.loaded

    stamp_checkpoint_file(plain, app="toy")
    assert load_checkpoint_file(plain, app="toy")["global_step"] == 8
    with pytest.raises(ForeignCheckpointError):
        stamp_checkpoint_file(plain, app="lm")


def test_stale_temporaries_of_dead_processes_and_this_one_are_removed(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {
            "own": temporary_path(tmp_path / "last.ckpt").name,
            "dead": f".last.ckpt.tmp-{dead.pid}-0123abcd",
            "live": f".last.ckpt.tmp-{live.pid}-0123abcd",
            "other": "last.ckpt.tmp-1-0123abcd",  # not our pattern (no leading dot)
        }
        for n in names.values():
            (tmp_path / n).write_bytes(b"x")
        removed = {p.name for p in remove_stale_temporaries(tmp_path)}
        assert removed == {names["own"], names["dead"]}
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["other"]])
    finally:
        live.kill()
        live.wait()


def test_kill_9_during_saves_always_leaves_a_loadable_last_ckpt(
    tmp_path: Path, tmpdir_elsewhere: Path
) -> None:
    """10 kills at random moments of a fit that saves ~50 MB twice per step; $TMPDIR on another filesystem.

    Measured (2-core VM): 6 kills of 10 landed inside a save (2 inside the save of last.ckpt); with
    TorchCheckpointIO instead, 2 of 10 left last.ckpt truncated or empty and 50 MB staged files in $TMPDIR.
    """
    rng = random.Random(0)
    out = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
    mid_save = 0
    for _ in range(10):
        before = _mtime(out / "last.ckpt")
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "ckpt_kill_writer.py"), str(out), "atomic"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while _mtime(out / "last.ckpt") == before:  # wait for this writer's first save
                assert proc.poll() is None, "the writer died before its first save"
                assert time.monotonic() < deadline, "no checkpoint after 120 s"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        mid_save += bool(_temporaries(out))
        ck = load_checkpoint_file(out / "last.ckpt", app="toy")
        assert ck["global_step"] >= 1
        remove_stale_temporaries(out)
        assert _temporaries(out) == []
        assert list(tmpdir_elsewhere.iterdir()) == []
    assert mid_save >= 1, "no kill landed inside a save: the test did not exercise an interrupted save"


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


class _LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append((trainer.current_epoch, float(outputs["loss"])))


def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_losses(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    """``moekit <app> fit`` for 3 epochs, and for 2 epochs then resumed from ``last.ckpt`` to 3: the third
    epoch's training losses are identical (shuffled data, seeded run; the checkpoint is saved after the
    epoch's validation, where nothing else draws random numbers before the next epoch)."""
    from pipelines.lightning_cli import MoekitCLI

    def fit(run_dir: Path, epochs: int, ckpt: Path | None = None) -> list[tuple[int, float]]:
        args = ["--config", str(toy_config), f"--run_dir={run_dir}", f"--trainer.max_epochs={epochs}"]
        cli = MoekitCLI(app="toy", args=args, run=False)
        rec = _LossRecorder()
        cli.trainer.callbacks.append(rec)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        return rec.losses

    full = fit(tmp_path / "full", 3)
    fit(tmp_path / "part", 2)
    resumed = fit(tmp_path / "part", 3, ckpt=tmp_path / "part" / "last.ckpt")
    third = [x for e, x in full if e == 2]
    assert [e for e, _ in resumed] == [2] * len(third)  # only the third epoch ran
    assert [x for _, x in resumed] == third
    # the losses move between epochs, so a resume that restarted from scratch or reused epoch 2 would differ
    assert [x for e, x in full if e == 1] != third
