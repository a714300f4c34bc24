"""Training-level invariants: the EvoMoE switch preserves the dense function and the DTS gate sparsifies as
the temperature falls; exact resume from a checkpoint (also from one written before the FFNs were moe_core
layers); a trained dense checkpoint upcycled by moe_core.surgery equals the dense model and trains; seeded
generation and the generate command on a saved checkpoint."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from apps.lm import commands
from apps.lm.data import LMDataModule
from apps.lm.evomoe import EvoMoECallback, evomoe_layers
from apps.lm.generate import generate, load_checkpoint
from apps.lm.model import LMConfig, TransformerLM, count_parameters, upcycle
from apps.lm.task import LMTask
from apps.lm.tokenizers import CharTokenizer
from moe_core.layer import DenseLayer, MoELayer
from moe_core.surgery.upcycling import upcycle_model

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40
TINY = dict(context_len=16, dim=16, n_layers=2, n_heads=2, ffn_hidden=32)


def _evomoe_model(**kw) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(
        config=LMConfig(vocab_size=23, ffn="evomoe", num_experts=4, top_k=2, **{**TINY, **kw})
    )


def test_dts_router_gets_top_k_from_config():
    m = _evomoe_model()
    assert all(layer.router.top_k == 2 for layer in evomoe_layers(m))


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_evomoe_switch_preserves_dense_function_without_diversification(mask_ratio):
    m = _evomoe_model().train()  # dropout 0; DTS soft phase in training mode
    x = torch.randint(0, 23, (3, 16))
    dense = m(x)
    assert dense.routings == []  # phase 1: expert 0 as a dense FFN, no router
    cb = EvoMoECallback(switch_step=5, mask_ratio=mask_ratio, max_temperature=2.0, min_temperature=0.1,
                        decay_steps=10)
    assert cb.apply(m, 4) is None and not any(layer.sparse for layer in evomoe_layers(m))
    assert cb.apply(m, 5) == pytest.approx(2.0)
    assert all(layer.sparse for layer in evomoe_layers(m))
    torch.manual_seed(1)
    sparse = m(x)
    assert len(sparse.routings) == 2
    # at the switch temperature every expert is active and the weights are the full softmax (sum 1), so
    # identical experts reproduce the dense expert exactly; the diversification masks must change the function
    for _, r in sparse.routings:
        assert bool(r.mask.all())
    if mask_ratio == 0.0:
        torch.testing.assert_close(sparse.logits, dense.logits, rtol=1e-5, atol=1e-5)
    else:
        assert (sparse.logits - dense.logits).abs().max() > 1e-3


def test_dts_active_experts_fall_as_temperature_anneals():
    m = _evomoe_model().train()
    cb = EvoMoECallback(
        switch_step=0,
        mask_ratio=0.0,
        max_temperature=4.0,
        min_temperature=0.02,
        decay_steps=40,
        schedule="exp",
        hard_step=50,
    )
    layer = evomoe_layers(m)[0]
    x = torch.randn(2048, 16)
    temps, active = [], []
    for step in (0, 10, 20, 30, 40, 50):
        temps.append(cb.apply(m, step))
        torch.manual_seed(0)  # same Gumbel noise at every temperature
        active.append(float(layer.router(x).mask.float().sum(-1).mean()))
    assert all(a > b for a, b in zip(temps[:4], temps[1:5], strict=True)), temps
    assert active[0] == pytest.approx(4.0)  # soft and hot: dense
    assert all(a > b for a, b in zip(active[:4], active[1:5], strict=True)), active
    assert active[4] < 1.5, active  # cold soft gate: close to one expert per token
    assert layer.router.hard and active[5] == pytest.approx(2.0)  # hard phase: exactly top_k


# -- Lightning: exact resume
# -------------------------------------------------------------------------------------
class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"].detach())


def _fit(tmp_path, *, ffn: str, max_steps: int, ckpt_path=None, save_every: int | None = None,
         config: LMConfig | None = None, task: LMTask | None = None):
    text = tmp_path / "corpus.txt"
    if not text.exists():
        text.write_text(TEXT, encoding="utf-8")
    L.seed_everything(0)
    extra = dict(num_experts=4, top_k=2) if ffn != "dense" else {}
    config = config if config is not None else LMConfig(ffn=ffn, **TINY, **extra)
    task = task if task is not None else LMTask(
        config=config, lr=3e-3, warmup_steps=2, log_routing_every_n_steps=3
    )
    dm = LMDataModule(
        text_path=str(text),
        tokenizer="char",
        context_len=16,
        batch_size=4,
        batches_per_epoch=5,
        max_val_windows=4,
        cache_path=str(tmp_path / "cache"),
    )
    rec = _LossRecorder()
    callbacks: list[L.Callback] = [rec]
    if ffn == "evomoe":
        callbacks.append(
            EvoMoECallback(
                switch_step=3, mask_ratio=0.3, max_temperature=2.0, min_temperature=0.2, decay_steps=6
            )
        )
    if save_every:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=tmp_path / "ckpt", every_n_train_steps=save_every, save_top_k=-1, filename="{step}"
            )
        )
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=bool(save_every),
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return task, rec.losses, trainer


@pytest.mark.parametrize("ffn", ["moe", "evomoe"])
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, ffn):
    # 12 steps cross two epoch boundaries (5 batches each); the checkpoint at step 7 is mid-epoch and, for
    # EvoMoE, after the switch (Gumbel noise draws from the global RNG, which the checkpoint carries)
    full, full_losses, _ = _fit(tmp_path, ffn=ffn, max_steps=12, save_every=7)
    ckpt = tmp_path / "ckpt" / "step=7.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed, res_losses, _ = _fit(tmp_path, ffn=ffn, max_steps=12, ckpt_path=str(ckpt))
    assert sorted(res_losses) == list(range(8, 13))
    for step in range(8, 13):
        assert res_losses[step] == pytest.approx(full_losses[step], rel=1e-6, abs=1e-7), step
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    # the run actually learns (otherwise equal losses would be a weak check)
    assert full_losses[12] < full_losses[1]


# -- generation
# ---------------------------------------------------------------------------------------------------
def _random_lm():
    tok = CharTokenizer.fit(TEXT)
    torch.manual_seed(0)
    return TransformerLM(config=LMConfig(vocab_size=tok.vocab_size, **TINY)), tok


def test_generation_is_seeded_and_greedy_is_argmax():
    model, tok = _random_lm()
    kw = dict(max_new_tokens=40, temperature=1.0)
    a = generate(model, tok, "First", seed=0, **kw)
    torch.manual_seed(123)  # the global RNG must not matter
    assert generate(model, tok, "First", seed=0, **kw) == a
    assert generate(model, tok, "First", seed=1, **kw) != a
    assert a.startswith("First") and len(a) == len("First") + 40
    greedy = generate(model, tok, "First", max_new_tokens=40, greedy=True, seed=None)
    assert generate(model, tok, "First", max_new_tokens=40, greedy=True, seed=7) == greedy
    # independent paths to the argmax: top-k 1 sampling and a nucleus smaller than any single token's mass
    assert generate(model, tok, "First", top_k=1, seed=5, **kw) == greedy
    assert generate(model, tok, "First", top_p=1e-6, seed=6, **kw) == greedy
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, "First", temperature=0.0)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, tok, "")


def test_generate_command_on_saved_checkpoint(tmp_path, capsys):
    task, _, trainer = _fit(tmp_path, ffn="moe", max_steps=3)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    def run(*argv: str) -> str:
        capsys.readouterr()
        commands.generate(["--ckpt", str(ckpt), *argv])
        return capsys.readouterr().out.removesuffix("\n")  # print's newline

    text = run("--prompt", "First", "--max-new-tokens", "12", "--greedy")
    assert text == generate(task.model, task.tokenizer, "First", max_new_tokens=12, greedy=True)
    # jsonargparse's own spellings reach the same call
    assert run("--prompt=First", "--max_new_tokens", "12", "--greedy", "true") == text
    sampled = run("--prompt", "All:", "--max-new-tokens", "12", "--top-p", "0.9", "--seed", "3")
    assert sampled == generate(task.model, task.tokenizer, "All:", max_new_tokens=12, top_p=0.9, seed=3)
    assert sampled != run("--prompt", "All:", "--max-new-tokens", "12", "--top-p", "0.9", "--seed", "4")
    with pytest.raises(FileNotFoundError):
        commands.generate(["--ckpt", str(tmp_path / "missing.ckpt")])


# -- moe_core.surgery on the LM
# ------------------------------------------------------------------------------------
def test_trained_dense_checkpoint_upcycles_into_an_equal_moe_that_trains(tmp_path):
    """Sparse upcycling (moe_core.surgery.upcycling) of a dense LM trained by Trainer: at init the MoE LM
    computes the dense LM's logits (renormalised top-2 over identical experts), its config rebuilds it, and
    it trains and checkpoints through LMTask like any MoE LM."""
    _, _, trainer = _fit(tmp_path, ffn="dense", max_steps=4)
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    dense, _ = load_checkpoint(tmp_path / "dense.ckpt")
    assert all(isinstance(b.ffn, DenseLayer) for b in dense.blocks)
    x = torch.randint(0, dense.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense(x).logits

    moe = upcycle(dense, num_experts=4, top_k=2).eval()
    assert all(isinstance(b.ffn, MoELayer) for b in moe.blocks)
    with torch.no_grad():
        out = moe(x)
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    assert [n for n, _ in out.routings] == ["layer0.ffn", "layer1.ffn"] == list(moe.routers_by_name())
    assert all(not torch.allclose(r.weights[:, 0], r.weights[:, 1]) for _, r in out.routings)  # real routing
    # raw (not renormalised) top-2 weights scale the FFN by their sum < 1: the equality above is not vacuous
    raw = upcycle_model(dense, ffn_names=["blocks.0.ffn", "blocks.1.ffn"], num_experts=4, top_k=2,
                        renormalize=False).eval()
    with torch.no_grad():
        assert (raw(x).logits - want).abs().max() > 1e-3
    # the config describes the model: same keys, and active parameters = dense + routers + a 2nd FFN copy
    TransformerLM(config=moe.config).load_state_dict(moe.state_dict())
    d, h, layers = TINY["dim"], TINY["ffn_hidden"], TINY["n_layers"]
    assert count_parameters(moe)["active"] == count_parameters(dense)["total"] + layers * (4 * d + 3 * d * h)

    task = LMTask(config=moe.config, lr=3e-3, warmup_steps=2)
    task.model.load_state_dict(moe.state_dict())
    start = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    _, losses, trainer = _fit(tmp_path, ffn="moe", max_steps=6, task=task)
    assert losses[6] < losses[1]
    moved = {n for n, p in task.model.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert {"blocks.0.ffn.router.gate.weight", "blocks.1.ffn.router.gate.weight"} <= moved
    trainer.save_checkpoint(tmp_path / "moe.ckpt")
    reloaded, _ = load_checkpoint(tmp_path / "moe.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, task.model.eval()(x).logits, rtol=0, atol=0)


# -- checkpoints written before the FFNs were moe_core layers
# ------------------------------------------------------------------
_NEW_TO_OLD = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _to_legacy(ckpt: dict, task: LMTask) -> list[str]:
    """The checkpoint as the app's own SwiGLU wrote it: ``ffn[.shared_experts].w1/w3/w2.weight`` in the
    ``nn.Linear`` ``(out, in)`` layout, AdamW moments likewise. Returns the legacy keys."""
    decay = [n for n, p in task.named_parameters() if p.requires_grad and p.dim() >= 2]
    legacy = []
    for key in list(ckpt["state_dict"]):
        m = re.fullmatch(r"(.*\.ffn(?:\.shared_experts)?)\.(gate_proj|up_proj|down_proj)", key)
        if m is None:
            continue
        old = f"{m[1]}.{_NEW_TO_OLD[m[2]]}.weight"
        ckpt["state_dict"][old] = ckpt["state_dict"].pop(key).t().contiguous()
        legacy.append(old)
        for opt in ckpt["optimizer_states"]:
            state = opt["state"][decay.index(key)]
            for k in ("exp_avg", "exp_avg_sq"):
                state[k] = state[k].t().contiguous()
    return legacy


def test_checkpoint_from_the_apps_own_swiglu_loads_and_resumes_exactly(tmp_path):
    """Checkpoints of the LM before its FFNs were moe_core layers (dense layer 0 and the shared experts were
    ``w2(silu(w1 x) * w3 x)`` with ``nn.Linear`` weights) load with the same function and resume training
    exactly: weights and AdamW moments are renamed and transposed on load."""
    cfg = LMConfig(ffn="moe", num_experts=4, top_k=2, num_shared_experts=1, first_dense_layers=1, **TINY)
    full, full_losses, _ = _fit(tmp_path, ffn="moe", max_steps=10, save_every=7, config=cfg)  # mid-epoch
    ckpt = torch.load(tmp_path / "ckpt" / "step=7.ckpt", weights_only=False)
    legacy = _to_legacy(ckpt, full)
    assert sorted(legacy) == sorted(f"model.blocks.{i}{p}.w{w}.weight" for w in (1, 2, 3)
                                    for i, p in ((0, ".ffn"), (1, ".ffn.shared_experts")))
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    model, _ = load_checkpoint(tmp_path / "legacy.ckpt")
    # the legacy tensors through the old SwiGLU formula give the loaded dense FFN's output
    sd, z = ckpt["state_dict"], torch.randn(5, TINY["dim"])
    old = F.linear(F.silu(F.linear(z, sd["model.blocks.0.ffn.w1.weight"])) * F.linear(
        z, sd["model.blocks.0.ffn.w3.weight"]), sd["model.blocks.0.ffn.w2.weight"])
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0].ffn(z).output, old)
    cfg_task = LMTask(config=cfg, lr=3e-3, warmup_steps=2, log_routing_every_n_steps=3)
    _, res_losses, _ = _fit(tmp_path, ffn="moe", max_steps=10, ckpt_path=str(tmp_path / "legacy.ckpt"),
                            task=cfg_task)
    assert sorted(res_losses) == list(range(8, 11))
    for step in range(8, 11):
        assert res_losses[step] == pytest.approx(full_losses[step], rel=1e-6, abs=1e-7), step


def _to_two_parameter_banks(ckpt: dict, task: LMTask) -> list[str]:
    """The checkpoint as moekit wrote it before 2fb615c: each SwiGLU bank's ``gate_up_proj (E, D, 2H)`` as
    ``gate_proj`` then ``up_proj`` ``(E, D, H)`` (registration order), AdamW moments split alike, every later
    optimizer id one higher. Returns the banks' prefixes."""
    decay = [n for n, p in task.named_parameters() if p.requires_grad and p.dim() >= 2]
    n_no_decay = sum(1 for p in task.parameters() if p.requires_grad and p.dim() < 2)
    banks = [n.removesuffix("gate_up_proj") for n in decay if n.endswith("experts.gate_up_proj")]
    sd = ckpt["state_dict"]
    for b in banks:
        sd[b + "gate_proj"], sd[b + "up_proj"] = sd.pop(b + "gate_up_proj").chunk(2, dim=-1)
    old = []  # the former decay group: each bank's gate_up_proj was gate_proj, up_proj
    for n in decay:
        base = n.removesuffix("gate_up_proj")
        old += [base + "gate_proj", base + "up_proj"] if n.endswith("experts.gate_up_proj") else [n]
    for opt in ckpt["optimizer_states"]:
        state, new_state = opt["state"], {}
        for i, n in enumerate(decay):
            if n.endswith("experts.gate_up_proj"):
                g, u = {}, {}
                for k, v in state[i].items():
                    g[k], u[k] = v.chunk(2, dim=-1) if k in ("exp_avg", "exp_avg_sq") else (v, v.clone())
                new_state[old.index(n.removesuffix("gate_up_proj") + "gate_proj")] = g
                new_state[old.index(n.removesuffix("gate_up_proj") + "up_proj")] = u
            else:
                new_state[old.index(n)] = state[i]
        for j in range(n_no_decay):
            new_state[len(old) + j] = state[len(decay) + j]
        opt["state"] = new_state
        opt["param_groups"][0]["params"] = list(range(len(old)))
        opt["param_groups"][1]["params"] = list(range(len(old), len(old) + n_no_decay))
    return banks


def test_checkpoint_with_two_parameter_expert_banks_resumes_exactly(tmp_path):
    """A fit checkpoint of the former expert layout (separate gate and up parameters, so one more optimizer
    id per bank) resumes with the same losses as the uninterrupted run: weights and AdamW moments are fused
    on load and the later optimizer ids shift back."""
    cfg = LMConfig(ffn="moe", num_experts=4, top_k=2, num_shared_experts=1, first_dense_layers=1, **TINY)
    full, full_losses, _ = _fit(tmp_path, ffn="moe", max_steps=10, save_every=7, config=cfg)  # mid-epoch
    ckpt = torch.load(tmp_path / "ckpt" / "step=7.ckpt", weights_only=False)
    banks = _to_two_parameter_banks(ckpt, full)
    assert banks == [f"model.blocks.{i}.ffn.experts." for i in range(1, TINY["n_layers"])]
    torch.save(ckpt, tmp_path / "two_parameter.ckpt")
    cfg_task = LMTask(config=cfg, lr=3e-3, warmup_steps=2, log_routing_every_n_steps=3)
    _, res_losses, _ = _fit(tmp_path, ffn="moe", max_steps=10, ckpt_path=str(tmp_path / "two_parameter.ckpt"),
                            task=cfg_task)  # fmt: skip
    assert sorted(res_losses) == list(range(8, 11))
    for step in range(8, 11):
        assert res_losses[step] == pytest.approx(full_losses[step], rel=1e-6, abs=1e-7), step


def test_aux_loss_free_bias_is_updated_from_each_steps_loads():
    """DeepSeek-V3's bias balancing, end to end through ``Trainer.fit``: the task adds the callback by itself
    and, per optimizer step, every biased router's bias moves by ``gamma * sign(mean - load)`` of the loads it
    saw (oracle: the same updates replayed by hand; a negligible lr so the replay stays exact).
    On the landed code the bias was never updated outside tests."""
    from torch.utils.data import DataLoader, TensorDataset

    from apps.lm.callbacks import RouterBiasUpdate, biased_routers

    torch.manual_seed(0)
    gamma, steps = 0.01, 5
    cfg = LMConfig(vocab_size=23, ffn="moe", num_experts=4, top_k=2, router="sigmoid_topk",
                   router_kwargs={"bias_update_speed": gamma}, **TINY)
    # lr 1e-12: Adam moves each weight by ~1e-12, far too little to flip a routing decision
    task = LMTask(config=cfg, lr=1e-12, min_lr=1e-12, warmup_steps=0, log_routing_every_n_steps=1)
    assert any(isinstance(c, RouterBiasUpdate) for c in task.configure_callbacks())
    x = torch.randint(0, 23, (4, 16))
    y = torch.roll(x, -1, dims=1)
    # oracle: replay the updates on a copy
    replay = TransformerLM(config=cfg)
    replay.load_state_dict(task.model.state_dict())
    routers = biased_routers(replay)
    assert len(routers) == TINY["n_layers"]
    counts: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: counts.__setitem__(n, out.counts()))
               for n, m in routers.items()]
    for _ in range(steps):
        replay.train()(x)
        for n, m in routers.items():
            c = counts[n].float()
            m.bias += gamma * torch.sign(c.mean() - c)
    for h in handles:
        h.remove()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(task, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=4))
    fitted = biased_routers(task.model)
    for n, m in routers.items():
        torch.testing.assert_close(fitted[n].bias, m.bias, rtol=0, atol=1e-7)
    assert sum(float(m.bias.abs().sum()) for m in routers.values()) > 0  # uneven loads moved the bias
    logged = sorted(k for k in trainer.callback_metrics if k.endswith("bias_e0"))
    assert logged == [f"routing/train/layer{i}.ffn/bias_e0" for i in range(TINY["n_layers"])], logged
    assert "routing/train/layer0.ffn/step_max_over_mean_load" in trainer.callback_metrics
