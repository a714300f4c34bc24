"""Registered predictors are stored as safetensors + JSON (:mod:`pipelines.portable`), not a pickle
(issue 14): round trips are exact, shared objects stay shared, and a crafted file that names code outside
moekit's packages is refused before anything runs."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moe_core.layer import build_moe_layer
from pipelines.portable import JSON_NAME, TENSORS_NAME, PortableError, load_portable, save_portable


class Kind(enum.Enum):
    A = "a"
    B = "b"


class Pair(NamedTuple):
    lo: float
    hi: float


@dataclass
class Transform:
    vocab: dict[str, list[str]]
    means: np.ndarray
    table: pd.DataFrame
    kind: Kind = Kind.B
    bounds: Pair = Pair(0.0, 1.0)
    keys: dict = field(default_factory=dict)
    _cache: object = None


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.moe = build_moe_layer(dim=8, hidden_dim=16, num_experts=4, top_k=2)
        self.head = nn.Linear(8, 7, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("scale", torch.tensor([2.0]))
        self.register_buffer("tmp", torch.zeros(3), persistent=False)
        self.act = F.silu
        self.others = [F.gelu, torch.sigmoid, torch.special.ndtr, F.softplus]  # torch C functions
        self.dtype_ = torch.bfloat16

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, D)
        b, t, d = h.shape
        y = self.moe(h.reshape(b * t, d)).output.reshape(b, t, d)  # (B, T, D)
        return self.head(self.act(y) * self.scale)


@dataclass
class Predictor:
    net: nn.Module
    transform: Transform
    again: Transform  # the same object twice


def _predictor() -> Predictor:
    torch.manual_seed(0)
    tr = Transform(
        vocab={"city": ["a", " b", "9"]},
        means=np.arange(4, dtype=np.float32),
        table=pd.DataFrame(
            {
                "user": ["u1", "u2"],
                "n": np.array([1, 2], dtype=np.int64),
                "x": [0.5, np.nan],
                "day": pd.to_datetime(["2022-04-25", "2022-05-06"]),
            },
            index=pd.Index([10, 20], name="row"),
        ),
        keys={3: "three", (1, 2): "pair"},
        _cache=lambda: None,  # a private cache: left out
    )
    return Predictor(net=Net().eval(), transform=tr, again=tr)


def test_round_trip_is_exact_and_keeps_sharing(tmp_path: Path) -> None:
    p = _predictor()
    ids = torch.randint(0, 7, (2, 5))
    with torch.no_grad():
        want = p.net(ids)
    save_portable(p, tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted([JSON_NAME, TENSORS_NAME])
    q = load_portable(tmp_path, extra_packages=[__name__.split(".")[0]])
    with torch.no_grad():
        got = q.net(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert q.net.head.weight is q.net.emb.weight
    assert q.transform is q.again
    assert q.net.act is F.silu and q.net.dtype_ is torch.bfloat16 and not q.net.training
    assert all(a is b for a, b in zip(q.net.others, [F.gelu, torch.sigmoid, torch.special.ndtr, F.softplus]))
    assert set(q.net.state_dict()) == set(p.net.state_dict())  # non-persistent buffer stays out of it
    assert q.transform.vocab == {"city": ["a", " b", "9"]}
    assert q.transform.keys == {3: "three", (1, 2): "pair"}
    assert q.transform.kind is Kind.B and q.transform.bounds == Pair(0.0, 1.0)
    np.testing.assert_array_equal(q.transform.means, p.transform.means)
    assert q.transform.means.dtype == np.float32
    pd.testing.assert_frame_equal(q.transform.table, p.transform.table)
    assert q.transform._cache is None  # the default of the class... not the lambda
    assert (
        "_cache"
        not in json.loads((tmp_path / JSON_NAME).read_text())["root"]["attrs"]["transform"]["attrs"]
    )


def test_a_public_attribute_that_is_code_is_an_error_naming_it(tmp_path: Path) -> None:
    p = _predictor()
    p.transform.vocab = {"f": lambda x: x}  # type: ignore[dict-item]
    with pytest.raises(PortableError, match=r"predictor\.transform\.vocab\.f: a lambda"):
        save_portable(p, tmp_path)


@pytest.mark.parametrize(
    ("node", "what"),
    [
        ({"@": "func", "v": "os:system"}, "function os:system is not allowed"),
        ({"@": "func", "v": "builtins:eval"}, "function builtins:eval is not allowed"),
        (
            {"@": "object", "id": 0, "cls": "subprocess:Popen", "attrs": {}},
            "class subprocess:Popen is not allowed",
        ),
        (
            {
                "@": "module",
                "id": 0,
                "cls": "torch.nn.modules.linear:Linear",
                "attrs": {"f": {"@": "func", "v": "torch.hub:load"}},
            },
            "function torch.hub:load is not allowed",
        ),
        ({"@": "class", "v": "pathlib:Path"}, "class pathlib:Path is not allowed"),
    ],
)
def test_a_crafted_file_naming_code_is_refused(tmp_path: Path, node: dict, what: str) -> None:
    save_portable({"x": torch.ones(2)}, tmp_path)
    tree = json.loads((tmp_path / JSON_NAME).read_text())
    tree["root"] = {"bad": node}
    (tmp_path / JSON_NAME).write_text(json.dumps(tree))
    with pytest.raises(PortableError, match=what):
        load_portable(tmp_path)


def test_missing_or_foreign_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(PortableError, match=f"{JSON_NAME}: missing"):
        load_portable(tmp_path)
    save_portable({"x": torch.ones(2)}, tmp_path)
    (tmp_path / TENSORS_NAME).write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(PortableError, match=f"{TENSORS_NAME}: not a readable safetensors file"):
        load_portable(tmp_path)
    (tmp_path / JSON_NAME).write_text('{"format": "pickle"}')
    with pytest.raises(PortableError, match="not a moekit portable predictor"):
        load_portable(tmp_path)
