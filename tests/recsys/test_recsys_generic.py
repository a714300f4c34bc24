"""The generic schema-driven loader on anyone's data (issue 15): the worked example YAML trains and predicts
on an unlabelled file, ``--data.help`` documents every field, validation carved from train, a missing
validation file is a clear error, categories keyed alike in training and serving, unseen categories counted
and logged, the dense missing-value policy, sequence features, per-feature embedding widths."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from apps.recsys.app import APP
from apps.recsys.data import MultiTaskDataModule, carve_validation
from apps.recsys.model import FeatureEmbedding, MultiTaskNet, SequencePooling
from apps.recsys.schema import FeatureSchema, TabularPreprocessor, normalise_category
from apps.recsys.task import MultiTaskRecTask
from moe_core.multigate import MMoE

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "apps" / "recsys" / "examples"
TOY_YAML = EXAMPLES / "toy.yaml"


def test_toy_csvs_are_what_the_script_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import apps.recsys.examples.make_toy as make_toy

    monkeypatch.setattr(make_toy, "HERE", tmp_path)
    make_toy.main()
    for name in ("toy_train.csv", "toy_test.csv", "toy_unlabelled.csv"):
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), name


def test_category_keys_are_normalised_alike() -> None:
    raw = pd.Series([9, 9.0, " 9 ", "9.0", "09", "0.50", "a ", " ?", "NA", float("nan"), 1e3, True])
    assert normalise_category(raw).tolist() == [
        "9",
        "9",
        "9",
        "9",
        "9",
        "0.5",
        "a",
        "?",
        "NA",
        "nan",
        "1000",
        "True",
    ]
    # a float column (one blank turns a CSV column to float) keys like the int column of training
    train = pd.DataFrame({"c": [1, 2, 3, 9], "x": [0.0, 1, 2, 3], "y": [0, 1, 0, 1]})
    pre = TabularPreprocessor.fit(train, FeatureSchema(categorical=("c",), numeric=("x",), labels=("y",)))
    serve = pd.DataFrame({"c": [9.0, 2.0, np.nan], "x": [1.0, 1, 1]})
    cat = pre.transform(serve, with_labels=False)["cat"][:, 0]
    want = pre.transform(pd.DataFrame({"c": [9, 2, 7], "x": [1.0, 1, 1]}), with_labels=False)["cat"][:, 0]
    assert cat.tolist() == want.tolist() and cat[0] > 0 and cat[2] == 0
    assert pre.transform(pd.DataFrame({"c": ["9", " 2 ", "9.0"], "x": [1.0] * 3}))["cat"][:, 0].tolist() == [
        cat[0], cat[1], cat[0]
    ]  # fmt: skip


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "u": rng.choice(["a", "b", "c"], n), "item": rng.integers(0, 5, n), "x": rng.normal(size=n),
        "hist": ["|".join(map(str, rng.integers(0, 8, rng.integers(0, 4)))) for _ in range(n)],
        "t": rng.permutation(n), "y": rng.integers(0, 2, n), "z": rng.integers(0, 2, n),
    })  # fmt: skip


def test_unseen_categories_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    schema = FeatureSchema(
        categorical=("u", "item"), numeric=("x",), labels=("y",), sequences={"hist": "item"}
    )
    train = _frame(200, 0)
    train["hist"] = "1|2"
    pre = TabularPreprocessor.fit(train, schema)
    test = _frame(10, 1)
    test["u"] = ["zz"] * 8 + ["a", "b"]  # 8 of 10 unseen -> warning
    test.loc[0, "item"] = 99
    test["hist"] = ["1|7|99"] + ["2"] * 9  # 7 and 99 unseen of 12 items
    assert pre.unseen_counts(test) == {"u": 8, "item": 1}
    with caplog.at_level(logging.INFO, logger="apps.recsys.schema"):
        out = pre.transform(test, source="test.csv", report_unseen=True)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "test.csv: unseen categories per column (mapped to OOV): u: 8/10, item: 1/10, hist: 2/12" in text
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "column 'u': 8 of 10 values (80%)" in warn[0].getMessage()
    assert (out["cat"][:8, 0] == 0).all() and out["cat"][0, 1] == 0
    # sequence ids index the shared item vocabulary; unseen ids are OOV (0) but still real positions
    item_idx = pre._index("item")
    assert out["seq"][0, 0, :3].tolist() == [item_idx["1"], 0, 0] and out["seq_mask"][0, 0].tolist()[:4] == [
        True, True, True, False
    ]  # fmt: skip


def test_dense_missing_values_policy(tmp_path: Path) -> None:
    df = _frame(30, 0)
    df["x"] = df["x"].astype(object)
    df.loc[6, "x"] = ""
    path = tmp_path / "train.csv"
    df.to_csv(path, index=False)
    raw = pd.read_csv(path, keep_default_na=False)
    base = dict(categorical=("u",), numeric=("x",), labels=("y",))
    msg = r"train.csv: numeric column 'x' has 1 missing value\(s\), the first in data row 7 \(1-based"
    with pytest.raises(ValueError, match=msg):
        TabularPreprocessor.fit(raw, FeatureSchema(**base), source=str(path))
    x = pd.to_numeric(raw["x"], errors="coerce")
    pre = TabularPreprocessor.fit(raw, FeatureSchema(**base, fill_missing="mean"))
    assert pre.means["x"] == pytest.approx(x.mean())  # NaN left out of the statistics
    num = pre.transform(raw)["num"][:, 0]
    assert num[6] == 0.0 and torch.isfinite(num).all()  # the mean standardises to 0
    pre0 = TabularPreprocessor.fit(raw, FeatureSchema(**base, fill_missing="zero"))
    assert pre0.transform(raw)["num"][6, 0] == pytest.approx((0 - pre0.means["x"]) / pre0.stds["x"])
    raw.loc[3, "x"] = "abc"
    with pytest.raises(ValueError, match=r"non-numeric value 'abc' \(data row 4, 1-based"):
        TabularPreprocessor.fit(raw, FeatureSchema(**base, fill_missing="mean"))


def test_validation_carved_from_train_and_missing_validation_is_clear(tmp_path: Path) -> None:
    df = _frame(100, 0)
    tr, va = carve_validation(df, "f.csv", fraction=0.2, time_column="t", seed=0)
    assert len(va[0]) == 20 and va[0]["t"].min() > tr[0]["t"].max()  # the latest rows by t
    tr2, va2 = carve_validation(df, "f.csv", fraction=0.2, time_column=None, seed=0)
    assert len(va2[0]) == 20 and set(va2[0]["t"]) != set(va[0]["t"])
    with pytest.raises(ValueError, match="val_time_column 'when' is not a column"):
        carve_validation(df, "f.csv", fraction=0.2, time_column="when", seed=0)
    df.to_csv(tmp_path / "train.csv", index=False)
    kw = dict(train_path=str(tmp_path / "train.csv"), categorical=["u"], numeric=["x"], labels=["y"])
    with pytest.raises(ValueError, match="no validation data: set data.init_args.val_path"):
        MultiTaskDataModule(**kw).setup("fit")
    with pytest.raises(FileNotFoundError, match="data file .*nope.csv not found"):
        MultiTaskDataModule(**kw, val_path=str(tmp_path / "nope.csv")).setup("fit")
    with pytest.raises(ValueError, match="val_time_column needs val_fraction"):
        MultiTaskDataModule(**kw, val_time_column="t")
    dm = MultiTaskDataModule(**kw, val_fraction=0.25, val_time_column="t")
    dm.setup("fit")
    assert len(dm.splits["train"]["cat"]) == 75 and len(dm.splits["val"]["cat"]) == 25


def test_per_feature_embedding_widths_and_sequence_pooling() -> None:
    emb = FeatureEmbedding(cardinalities=[3, 5, 4], num_numeric=2, embed_dim=4, embed_dims={"b": 6},
                           names=["a", "b", "c"])  # fmt: skip
    assert emb.out_dim == 4 + 6 + 4 + 2 and emb.dims == [4, 6, 4]
    cat, num = torch.tensor([[2, 4, 1]]), torch.randn(1, 2)
    v = emb(cat, num)  # (1, 16): the width-4 group (a, c), then b, then the numeric values
    torch.testing.assert_close(v[0, :4], emb.lookup(0, cat[0, 0]))
    torch.testing.assert_close(v[0, 4:8], emb.lookup(2, cat[0, 2]))
    torch.testing.assert_close(v[0, 8:14], emb.lookup(1, cat[0, 1]))
    with pytest.raises(ValueError, match=r"unknown columns \['zz'\]"):
        FeatureEmbedding(cardinalities=[3], num_numeric=0, embed_dim=4, embed_dims={"zz": 2}, names=["a"])
    with pytest.raises(ValueError, match="categorical b has index 5 outside its table"):
        emb(torch.tensor([[0, 5, 0]]), num)

    keys, mask = torch.randn(2, 4, 3), torch.tensor([[True, True, False, False], [False] * 4])
    mean = SequencePooling(dim=3, mode="mean")(keys, mask, torch.randn(2, 3))
    torch.testing.assert_close(mean[0], keys[0, :2].mean(0))
    assert (mean[1] == 0).all()  # empty history
    din = SequencePooling(dim=3, mode="din")
    q = torch.randn(2, 3)
    a = din.attention(torch.cat([keys, q[:, None].expand_as(keys), keys - q[:, None], keys * q[:, None]], -1))
    w = torch.softmax(a[0, :2, 0], 0)
    torch.testing.assert_close(din(keys, mask, q)[0], (w[:, None] * keys[0, :2]).sum(0))
    keys2 = keys.clone()
    keys2[0, 2:] = 100.0  # padded positions never matter
    torch.testing.assert_close(din(keys2, mask, q), din(keys, mask, q))

    net = MultiTaskNet(cardinalities=[3, 5], num_numeric=1, num_tasks=2, embed_dim=4, sequence_targets=[1],
                       backbone=partial(MMoE, num_experts=2, expert_hidden=[8]))  # fmt: skip
    with pytest.raises(ValueError, match=r"give seq and seq_mask of shape \(B, 1, L\)"):
        net(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 1))


def test_data_help_names_every_field_with_help_text() -> None:
    import inspect

    from jsonargparse import ArgumentParser

    from apps.recsys.kuairand import KuaiRandDataModule

    for cls in (MultiTaskDataModule, KuaiRandDataModule):
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "data")
        actions = {a.dest: a for a in parser._actions if a.dest.startswith("data.")}
        for name in inspect.signature(cls.__init__).parameters:
            if name == "self":
                continue
            help_text = actions[f"data.{name}"].help
            assert help_text and len(help_text) > 10, (cls.__name__, name, help_text)


def test_data_help_by_short_class_name(capsys: pytest.CaptureFixture) -> None:
    from pipelines.cli import main

    with pytest.raises(SystemExit) as e:
        main(["recsys", "fit", "--config", str(TOY_YAML), "--data.help", "MultiTaskDataModule"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for field in ("val_fraction", "val_time_column", "sequences", "fill_missing", "predict_path"):
        assert f"--data.init_args.{field}" in out or f"--data.{field}" in out, field
    assert "the share of train rows held out for validation" in " ".join(out.split())


@pytest.mark.slow
def test_worked_example_trains_and_predicts_an_unlabelled_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The docs' example YAML as a user runs it: fit, then ``predict`` on a file without label columns writes
    one probability per task and row, equal to the trained network's, and prints the file's path."""
    from pipelines.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(REPO)  # the example's paths are relative to the repository root
    common = ["--config", str(TOY_YAML), "--trainer.enable_progress_bar=false"]
    main(["recsys", "fit", *common, f"--run_dir={tmp_path / 'fit'}", "--trainer.max_epochs=10"])
    ckpt = tmp_path / "fit" / "last.ckpt"
    assert ckpt.is_file()
    unlabelled = EXAMPLES / "toy_unlabelled.csv"
    main(["recsys", "predict", *common, f"--run_dir={tmp_path / 'pred'}", f"--ckpt_path={ckpt}",
          f"--data.init_args.predict_path={unlabelled}"])  # fmt: skip
    path = tmp_path / "pred" / "predictions.parquet"
    assert f"predictions: {path}" in capsys.readouterr().out
    got = pd.read_parquet(path)
    assert list(got.columns) == ["click", "like"] and len(got) == 50
    # predict preprocesses with the checkpoint's vocabularies and statistics, not with a refit on whatever
    # train_path and val_fraction hold now: a renamed user (every later category id shifts) and another
    # validation share (other numeric statistics) leave the predictions exactly as they were
    changed = pd.read_csv(EXAMPLES / "toy_train.csv", keep_default_na=False)
    changed["user_id"] = changed["user_id"].replace({"u34": "a_new_user"})
    changed.to_csv(tmp_path / "train_changed.csv", index=False)
    main(["recsys", "predict", *common, f"--run_dir={tmp_path / 'pred2'}", f"--ckpt_path={ckpt}",
          f"--data.init_args.predict_path={unlabelled}", "--data.init_args.val_fraction=0.3",
          f"--data.init_args.train_path={tmp_path / 'train_changed.csv'}"])  # fmt: skip
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "pred2" / "predictions.parquet"), got)
    # and so does `moekit register` with the same changed settings: the registered model scores like predict
    import mlflow

    from pipelines.commands import register_checkpoint

    changed_args = [f"--data.init_args.train_path={tmp_path / 'train_changed.csv'}",
                    "--data.init_args.val_fraction=0.3", f"--run_dir={tmp_path / 'reg'}"]  # fmt: skip
    version = register_checkpoint(app="recsys", configs=[str(TOY_YAML)], ckpt=str(ckpt), name="toy-rec",
                                  extra_args=changed_args)  # fmt: skip
    served = mlflow.pyfunc.load_model(f"models:/toy-rec/{version}").predict(
        pd.read_csv(unlabelled, keep_default_na=False)
    )
    np.testing.assert_allclose(served.to_numpy(), got.to_numpy(), rtol=1e-5, atol=1e-6)
    # other columns than the checkpoint was trained on: one line naming the difference
    with pytest.raises(SystemExit):
        main(["recsys", "predict", *common, f"--run_dir={tmp_path / 'pred3'}", f"--ckpt_path={ckpt}",
              f"--data.init_args.predict_path={unlabelled}", "--data.init_args.numeric=[price]",
              "--data.init_args.log1p=[price]"])  # fmt: skip
    err = capsys.readouterr().err
    assert "was trained on other data settings than the config's (numeric: ('price', 'age') there" in err

    task = MultiTaskRecTask.load_from_checkpoint(ckpt, weights_only=True)
    dm = MultiTaskDataModule(**{k: v for k, v in _toy_data_args().items()})
    dm.setup("fit")
    x = dm.preprocessor.transform(pd.read_csv(unlabelled, keep_default_na=False), with_labels=False)
    task.eval()
    with torch.no_grad():
        want = torch.sigmoid(task(x["cat"], x["num"], x["seq"], x["seq_mask"]).logits).numpy()
    np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-5, atol=1e-6)
    # it learned the example's signal (category matches history): test AUC of click well above chance
    test = pd.read_csv(EXAMPLES / "toy_test.csv", keep_default_na=False)
    xt = dm.preprocessor.transform(test)
    with torch.no_grad():
        p = torch.sigmoid(task(xt["cat"], xt["num"], xt["seq"], xt["seq_mask"]).logits[:, 0]).numpy()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(test["click"], p) > 0.62  # measured 0.68 (10 epochs); the true logit scores 0.79
    predictor = APP.build_predictor(task, dm)
    served = predictor.predict(pd.read_csv(unlabelled, keep_default_na=False))
    np.testing.assert_allclose(served.to_numpy(), want, rtol=1e-5, atol=1e-6)


def _toy_data_args() -> dict:
    import yaml

    args = dict(yaml.safe_load(TOY_YAML.read_text())["data"]["init_args"])
    for k in ("train_path", "test_path"):
        args[k] = str(REPO / args[k])
    return args


def test_toy_yaml_parses_and_fits_one_epoch(tmp_path: Path) -> None:
    dm = MultiTaskDataModule(**_toy_data_args())
    mmoe = partial(MMoE, num_experts=2, expert_hidden=[8])
    task = MultiTaskRecTask(backbone=mmoe, embed_dims={"user_id": 3}, seq_pooling="mean")
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, dm)
    assert task.net.embedding.dims[dm.feature_names.index("user_id")] == 3
    assert task.hparams.sequence_targets == [dm.feature_names.index("item_id")]
    assert len(dm.splits["val"]["cat"]) == 600 and dm.splits["train"]["seq"].shape[1:] == (1, 20)


def test_label_and_numeric_errors_name_the_file_row_also_in_a_carved_part(tmp_path: Path) -> None:
    """New-user trial: a label value 2 gave 'not binary; found values [2]' with no row, NaN and text labels
    the same 'missing or non-numeric values', and rows of a part carved from train counted in the part."""
    df = _frame(40, 0)
    df["t"] = np.arange(40)[::-1]  # the latest rows by t are the file's first ones: val = file rows 1-8
    kw = dict(categorical=["u"], numeric=["x"], labels=["y"], val_fraction=0.2, val_time_column="t")
    path = tmp_path / "train.csv"

    def error(frame: pd.DataFrame) -> str:
        frame.to_csv(path, index=False)
        with pytest.raises(ValueError) as e:
            MultiTaskDataModule(train_path=str(path), **kw).setup("fit")
        return str(e.value)

    bad = df.assign(y=df["y"].astype(object))
    bad.loc[[14, 30], "y"] = 2  # file rows 15 and 31, both in the train part (file rows 9-40)
    msg = error(bad)
    assert "[train part]: label column 'y' is not binary (0/1): 2 row(s) hold [2]" in msg
    assert "the first in data row 15 (1-based, header not counted)" in msg
    bad = df.assign(y=df["y"].astype(object))
    bad.loc[[20, 25], "y"] = ""
    assert "label column 'y' has 2 missing value(s), the first in data row 21 (1-based" in error(bad)
    bad.loc[[20, 25], "y"] = "yes"
    assert "has 2 non-numeric value(s), the first 'yes' in data row 21 (1-based" in error(bad)
    bad = df.assign(x=df["x"].astype(object))
    bad.loc[9, "x"] = "abc"  # file row 10: the second row of the train part
    assert "numeric column 'x' has non-numeric value 'abc' (data row 10, 1-based" in error(bad)


def test_served_null_in_a_string_column_scores_as_the_training_missing_value() -> None:
    """New-user trial: a training file with null regions (keyed "nan") served a null region as a 400; a null
    is now the training's missing value where that column had some, and still a 400 where it had none."""
    train = pd.DataFrame({
        "region": pd.Series(["north", None, "south", "north", None, "east"], dtype="str"),
        "device": ["ios", "web", "ios", "web", "ios", "web"], "y": [0, 1, 0, 1, 1, 0],
    })  # fmt: skip
    pre = TabularPreprocessor.fit(train, FeatureSchema(categorical=("region", "device"), labels=("y",)))
    assert "nan" in pre.vocabularies["region"]
    request = pd.DataFrame({"region": [None, "south", float("nan")], "device": ["ios", "web", "web"]})
    checked = pre.check_request(request)
    assert checked["region"].tolist() == ["nan", "south", "nan"]
    got = pre.transform(checked, with_labels=False)["cat"]
    want = pre.transform(train.iloc[[1, 2, 4]].assign(device=["ios", "web", "web"]), with_labels=False)["cat"]
    assert torch.equal(got, want)  # the same ids as the training rows with a missing region
    with pytest.raises(ValueError, match=r"column 'device' row 1: expected a string, got (None|nan)"):
        pre.check_request(request.assign(device=["ios", None, "web"]))
