"""ExpertParallelStrategy (Lightning DDP + expert parallelism / sparse materialisation) on 2 spawned
processes trains exactly like one process on the concatenated batches; its state loads at world size 1."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moekit_parallel_lit as LT  # noqa: E402
import moekit_parallel_workers as W  # noqa: E402

from pipelines.strategies import ExpertParallelStrategy  # noqa: E402

WORLD = 2


def _reference_state() -> tuple[list[float], dict]:
    net = W.TinyNet().double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    xs, ys = W.train_batches(WORLD)
    losses = []
    for x, y in zip(xs.double(), ys.double()):
        loss = ((net(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, net.state_dict()


@pytest.mark.parametrize("mode", ["expert_parallel", "sparse"])
def test_lightning_strategy_matches_single_process_and_checkpoint_loads_at_world1(mode, tmp_path):
    loss_file = tmp_path / "losses.pt"
    lit = LT.LitTiny(str(loss_file), world=WORLD)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=ExpertParallelStrategy(mode=mode, start_method="spawn"),
        max_steps=W.STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        use_distributed_sampler=False,
    )
    trainer.fit(lit)
    ref_losses, ref_state = _reference_state()
    assert torch.load(loss_file) == pytest.approx(ref_losses, rel=1e-9, abs=1e-12)
    # ddp_spawn hands rank 0's state_dict back: the experts were gathered into full single-process tensors
    got = lit.net.state_dict()
    assert set(got) == set(ref_state)
    for k, v in ref_state.items():
        torch.testing.assert_close(got[k], v, rtol=1e-7, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
