"""Training-at-scale switches of the LM (issue 17): per-block activation checkpointing and ``torch.compile``
give the eager model's loss and gradients (compile on CPU, inductor)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from apps.lm.model import LMConfig
from apps.lm.task import LMTask

CFG = LMConfig(vocab_size=64, context_len=16, dim=32, n_layers=2, n_heads=2, ffn_hidden=32, ffn="moe",
               num_experts=4, top_k=2, expert_hidden=16, num_shared_experts=1)  # fmt: skip


def _loss_and_grads(task: LMTask, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    task.model.train()
    task.model.zero_grad(set_to_none=True)
    loss = task._losses(task.model(x), y)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("router", ["topk", "noisy_topk"])
def test_activation_checkpointing_same_loss_and_grads(router):
    torch.manual_seed(0)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    eager = LMTask(config=dataclasses.replace(CFG, router=router))
    ckpt = LMTask(config=dataclasses.replace(CFG, router=router, activation_checkpointing=True))
    ckpt.model.load_state_dict(eager.model.state_dict())
    torch.manual_seed(1)  # noisy routing: recomputation must replay the same noise
    l0, g0 = _loss_and_grads(eager, x, y)
    torch.manual_seed(1)
    l1, g1 = _loss_and_grads(ckpt, x, y)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7, msg=n)
    # it really recomputes: the checkpointed forward keeps fewer saved tensors
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ckpt.model(x).logits.sum()
    with_ckpt = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        eager.model(x).logits.sum()
    assert with_ckpt < 0.5 * sum(saved)


@pytest.mark.slow
def test_torch_compile_on_cpu_same_loss_and_grads():
    torch.manual_seed(0)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    eager = LMTask(config=dataclasses.replace(CFG, n_layers=1))  # auto: grouped_mm is not traceable in fp32
    comp = LMTask(config=eager.config, compile=True)
    comp.model.load_state_dict(eager.model.state_dict())
    comp.configure_model()
    assert comp.model._compiled_call_impl is not None
    assert list(comp.model.state_dict()) == list(eager.model.state_dict())  # checkpoints keep their keys
    l0, g0 = _loss_and_grads(eager, x, y)
    l1, g1 = _loss_and_grads(comp, x, y)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_flops_per_token_count_only_active_experts_and_mfu_is_logged(tmp_path):
    import lightning as L

    from apps.lm.data import LMDataModule
    from apps.lm.task import training_flops_per_token

    dense = LMTask(config=dataclasses.replace(CFG, ffn="dense", ffn_hidden=48, num_shared_experts=0)).model
    moe = LMTask(config=dataclasses.replace(CFG, num_shared_experts=0, expert_hidden=24)).model  # k=2 x 24
    d, t, layers, v = 32, 16, 2, 64
    attn = 4 * d * d + 2 * d  # qkv + proj + 2 norms per block (+ final norm below)
    dense_params = layers * (attn + 3 * d * 48) + d + v * d
    assert training_flops_per_token(dense) == 6 * dense_params + 12 * layers * d * t
    routers = layers * 4 * d
    assert training_flops_per_token(moe) == training_flops_per_token(dense) + 6 * routers  # same active FFN
    (tmp_path / "t.txt").write_text("abcdefgh " * 300, encoding="utf-8")
    dm = LMDataModule(text_path=str(tmp_path / "t.txt"), context_len=16, batch_size=4, batches_per_epoch=3,
                      cache_path=str(tmp_path / "c"))
    task = LMTask(config=dataclasses.replace(CFG, vocab_size=None), peak_flops=1e9)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(task, datamodule=dm)
    m = trainer.callback_metrics
    fpt = training_flops_per_token(task.model)
    assert float(m["train/mfu"]) == pytest.approx(float(m["train/tokens_per_s"]) * fpt / 1e9, rel=1e-5)
