"""What a JSON client cannot help sending is widened losslessly before MLflow checks the signature (a
new-user trial got 400 for ``"dwell_s": 30`` in a float column and ``"sku": "1010"`` in an integer categorical
column, both documented as accepted); anything lossy still reaches the signature check and is a 400."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.models.utils import _enforce_schema
from mlflow.types import ColSpec, Schema

from pipelines.serve import widen_json_columns

SCHEMA = Schema([ColSpec("double", "f"), ColSpec("long", "i"), ColSpec("string", "s")])


def _frame(**cols: list) -> pd.DataFrame:
    base = {"f": [1.5, 2.0], "i": [1, 2], "s": ["a", "b"]}
    return pd.DataFrame({**base, **cols})


@pytest.mark.parametrize(
    ("cols", "want"),
    [
        ({"f": [30, 2]}, {"f": [30.0, 2.0]}),  # JSON.stringify(30.0) == "30"
        ({"i": ["1010", 2]}, {"i": [1010, 2]}),  # an integer column keyed from strings, as in a CSV
        ({"i": [" -7 ", "+3"]}, {"i": [-7, 3]}),
    ],
)
def test_lossless_widening_passes_the_signature(cols: dict, want: dict) -> None:
    out = widen_json_columns(_frame(**cols), SCHEMA)
    _enforce_schema(out, SCHEMA)  # raises on a refused type
    for k, v in want.items():
        assert out[k].tolist() == v
        assert out[k].dtype == (np.float64 if k == "f" else np.int64)


@pytest.mark.parametrize(
    "cols",
    [
        {"f": [2**60, 2]},  # not exact in float64
        {"i": ["abc", 2]},  # not an integer
        {"i": [38.9, 2]},  # a fraction in an integer column
        {"i": [True, 2]},  # a boolean is not a number here
        {"i": ["12345678901234567", 1]},  # beyond 2**53
    ],
)
def test_lossy_values_are_left_for_the_signature_to_refuse(cols: dict) -> None:
    frame = _frame(**cols)
    out = widen_json_columns(frame, SCHEMA)
    with pytest.raises(Exception, match="Incompatible input types"):
        _enforce_schema(out, SCHEMA)
    pd.testing.assert_frame_equal(out, frame)  # untouched


def test_no_schema_or_no_frame_is_untouched() -> None:
    frame = _frame(f=[30, 2])
    assert widen_json_columns(frame, None) is frame
    assert widen_json_columns([1, 2], SCHEMA) == [1, 2]
