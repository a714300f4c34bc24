"""LightningModule for MoE LM pretraining: ``loss = CE + w_balance * balance + w_z * z + w_entropy *
entropy``.

``balance`` and ``entropy`` are what each router declares (``router.aux_losses``: the loss its paper defines,
summed over routing decisions): Switch balance for top-k, Shazeer's importance + load for noisy top-k,
AdaMoE's null-aware balance, DeepSeek-V3's sequence-wise balance on normalised sigmoid scores, the dynamic
top-p paper's entropy loss plus balance, nothing for a router that needs none. ``z`` is ST-MoE's router
z-loss on every routing decision. DeepSeek-V3's aux-loss-free bias is updated by
:class:`apps.lm.callbacks.RouterBiasUpdate`, added automatically when the model has a biased router.

Logs each loss term, tokens/s, val loss and perplexity, and per routing decision every scalar of
``moe_core.stats.routing_stats`` (load balance, load entropy, router entropy, active experts, drops) under
``routing/<stage>/<routing name>/<statistic>``, e.g. ``routing/train/layer1.ffn/max_over_mean_load``. The
tokenizer travels in the checkpoint (``checkpoint["lm_tokenizer"]``) so that ``apps.lm.generate`` needs
nothing but the checkpoint. No device code: Lightning places tensors, so precision (``bf16-mixed``),
gradient accumulation/clipping and DDP are trainer options.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from apps.lm.callbacks import RouterBiasUpdate, biased_routers
from apps.lm.data import IGNORE_INDEX
from apps.lm.model import (
    LMConfig,
    LMOutput,
    TransformerLM,
    as_lm_config,
    count_parameters,
    upgrade_state_dict,
)
from moe_core.losses import router_z_loss, sum_aux_losses
from moe_core.stats import routing_stats

log = logging.getLogger(__name__)


class LMTask(L.LightningModule):
    """Next-token prediction with MoE auxiliary losses.

    Args:
        config: model architecture (``vocab_size`` None = take it from the data module).
        lr: peak AdamW learning rate.
        min_lr: final learning rate of the cosine decay.
        warmup_steps: linear warm-up steps.
        decay_steps: steps of the cosine decay after warm-up (None: ``trainer.max_steps``; constant if
            unknown).
        weight_decay: AdamW weight decay on matrices (not on norms).
        betas: AdamW betas.
        w_balance: weight of the balance loss each router declares (summed over routing decisions; the
            sequence-wise DeepSeek-V3 loss uses the paper's alpha 1e-4, Switch 1e-2).
        w_z: weight of the router z-loss (summed over routing decisions).
        w_entropy: weight of the entropy loss a router declares (only dynamic top-p does; the paper's beta
            1e-4); 0 disables.
        log_routing_every_n_steps: period of the training routing statistics (``routing/train/...``).
        init_weights: start from the weights of a moekit LM checkpoint (``moekit lm import`` of a transformers
            model, or any ``lm fit``/``merge``/``quantize`` checkpoint) of the same architecture: continued
            pretraining with fresh optimizer state. Read weights-only; shapes must match the config.
        peak_flops: the device's peak FLOP/s for the MFU logged as ``train/mfu`` (None: measured once at fit
            start with a large matmul on the model's device, in the autocast dtype under ``bf16``/``16``
            precision, else the parameters' dtype, :func:`measure_peak_flops`; 0: no MFU).
        compile: compile the network with ``torch.compile`` (``nn.Module.compile``: same parameters and
            state-dict keys; the first steps pay the compilation). ``compile_mode``: its ``mode``.
        compile_mode: ``torch.compile`` mode (None: default; ``max-autotune`` etc.).
        fused_optimizer: use PyTorch's fused AdamW kernel (one pass over all parameters instead of a Python
            loop of per-tensor ops; same update). None: where every parameter is a plain tensor on CPU or
            CUDA (not under FSDP's sharded tensor subclasses).
    """

    def __init__(
        self,
        *,
        config: LMConfig = LMConfig(),  # noqa: B008 - never mutated (replaced); a dataclass default shows its fields in --model.help
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        w_balance: float = 0.01,
        w_z: float = 0.001,
        w_entropy: float = 1e-4,
        log_routing_every_n_steps: int = 50,
        init_weights: str | None = None,
        peak_flops: float | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        fused_optimizer: bool | None = None,
    ) -> None:
        super().__init__()
        if not lr > 0 or not 0 <= min_lr <= lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={lr}, min_lr={min_lr}")
        config = as_lm_config(config)
        self.save_hyperparameters()
        self.config = config
        self.lr, self.min_lr, self.warmup_steps, self.decay_steps = lr, min_lr, warmup_steps, decay_steps
        self.weight_decay, self.betas = weight_decay, tuple(betas)
        self.w_balance, self.w_z, self.w_entropy = w_balance, w_z, w_entropy
        self.log_routing_every_n_steps = log_routing_every_n_steps
        self.fused_optimizer = fused_optimizer
        self.init_weights = init_weights
        self.compile, self.compile_mode = compile, compile_mode
        self.peak_flops = peak_flops
        self._flops_per_token: float | None = None
        self._initialised = False
        self.model: TransformerLM | None = (
            TransformerLM(config=config) if config.vocab_size is not None else None
        )
        self.tokenizer = None
        self._t0: float | None = None
        # per token id: (bytes, word starts inside, first byte non-space, last byte space); see
        # apps.lm.tokenizers.token_byte_table. Not persistent: rebuilt from the tokenizer.
        self.register_buffer("token_table", None, persistent=False)
        self.word_ppl = False
        self._acc: dict[str, torch.Tensor] = {}

    # -- model construction linked to the data
    # ----------------------------------------------------------------
    def _link_datamodule(self) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "vocab_size"):
            return
        vocab = dm.vocab_size
        self.tokenizer = getattr(dm, "tokenizer", None)
        table = getattr(dm, "token_table", None)
        if table is not None:
            self.token_table = table.to(self.device)
        self.word_ppl = bool(getattr(dm, "word_ppl", False))
        if self.config.vocab_size is None:
            self.config = dataclasses.replace(self.config, vocab_size=vocab)
            # checkpoints carry the resolved vocabulary size, in the form the hyper-parameters hold: under
            # LightningCLI a mapping, which its stored instantiator re-parses on
            # ``LMTask.load_from_checkpoint`` (an LMConfig object there failed with "argument after ** must
            # be a mapping, not LMConfig"); in plain Python the LMConfig itself
            held = self.hparams.get("config")
            resolved = {**held, "vocab_size": vocab} if isinstance(held, Mapping) else self.config
            self.hparams["config"] = resolved
        elif self.config.vocab_size != vocab:
            raise ValueError(
                f"model config.vocab_size={self.config.vocab_size} but the data's tokenizer has {vocab} "
                f"tokens; set model.config.vocab_size to null (linked) or {vocab}"
            )
        dm_ctx = getattr(dm, "context_len", None)
        if dm_ctx is not None and dm_ctx > self.config.context_len:
            raise ValueError(
                f"data context_len={dm_ctx} exceeds model config.context_len={self.config.context_len}"
            )

    def configure_model(self) -> None:
        self._link_datamodule()
        if self.model is None:
            if self.config.vocab_size is None:
                raise ValueError("config.vocab_size is unknown: pass it or train with an LMDataModule")
            self.model = TransformerLM(config=self.config)
        if self.init_weights and not self._initialised:
            self._load_init_weights(self.init_weights)
        if self.compile and not getattr(self.model, "_compiled_call_impl", None):
            self.model.compile(mode=self.compile_mode)  # in place: parameters and state-dict keys unchanged

    def _load_init_weights(self, path: str) -> None:
        """Copy the model weights of a moekit LM checkpoint (strict: every tensor, same shapes)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"init_weights {path}: not a moekit LM checkpoint (no state_dict)")
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"init_weights {path} does not fit model.config (use the config `moekit lm import` printed): "
                f"{str(e).splitlines()[0]} {str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else ''}"
            ) from None
        self._initialised = True
        if self.tokenizer is None and "lm_tokenizer" in ckpt:
            from apps.lm.tokenizers import tokenizer_from_json

            self.tokenizer = tokenizer_from_json(ckpt["lm_tokenizer"])

    def forward(self, idx: torch.Tensor) -> LMOutput:
        return self.model(idx)

    def configure_callbacks(self) -> list[L.Callback]:
        """DeepSeek-V3's aux-loss-free bias only balances if it is updated: add the hook whenever the model
        has a biased router (a ``RouterBiasUpdate`` in the trainer's callbacks is replaced by this one)."""
        # called before configure_model (the model may not exist yet): decide from the config
        cfg = self.config
        biased = cfg.router == "sigmoid_topk" and cfg.router_kwargs.get("use_bias", True)
        sparse = any(cfg.sparse_layer(i) for i in range(cfg.n_layers)) and cfg.ffn in ("moe", "coe")
        has = biased and sparse or (self.model is not None and bool(biased_routers(self.model)))
        return [RouterBiasUpdate()] if has else []

    # -- losses
    # -----------------------------------------------------------------------------------------------
    def _losses(self, out: LMOutput, y: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))  # (B*T, V)
        zero = ce.new_zeros(())
        routers = self.model.routers_by_name() if out.routings else {}
        # the loss each router's paper defines; the N = B*T routed tokens are B sequences (sequence-wise)
        declared = sum_aux_losses(((routers[name], r) for name, r in out.routings), batch_size=y.shape[0])
        bal, ent = declared.get("balance", zero), declared.get("entropy", zero)
        zl = sum((router_z_loss(r) for _, r in out.routings), zero)
        loss = ce + self.w_balance * bal + self.w_z * zl + self.w_entropy * ent
        return {"loss": loss, "ce": ce, "balance": bal, "z": zl, "entropy": ent}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        terms = self._losses(out, y)
        for k, v in terms.items():
            self.log(f"train/{k}", v, on_step=True, on_epoch=False, prog_bar=k == "loss")
        if out.routings and self.global_step % self.log_routing_every_n_steps == 0:
            self._log_routing(out, "train")
        return terms["loss"]

    def on_fit_start(self) -> None:
        if self.peak_flops is None:
            p = next(self.model.parameters())
            precision = str(getattr(self.trainer, "precision", "")) if self._trainer is not None else ""
            # under bf16/fp16 autocast the matmuls run in the half type: measure that peak
            dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else p.dtype
            self.peak_flops = measure_peak_flops(p.device, dtype)
        self._flops_per_token = training_flops_per_token(self.model)
        if self.peak_flops:
            log.info("%.2f MFLOP per trained token (active experts only), measured peak %.1f GFLOP/s",
                     self._flops_per_token / 1e6, self.peak_flops / 1e9)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t0 is not None:
            dt = time.perf_counter() - self._t0
            tps = batch[0].numel() / max(dt, 1e-9)
            self.log("train/tokens_per_s", tps, on_step=True, on_epoch=False)
            if self.peak_flops and self._flops_per_token:
                self.log("train/mfu", tps * self._flops_per_token / self.peak_flops, on_step=True,
                         on_epoch=False)

    def _log_routing(self, out: LMOutput, stage: str) -> None:
        """Every statistic of ``moe_core.stats.routing_stats`` per routing decision; the per-expert load
        vector as ``expert_load_e<i>``."""
        for name, r in out.routings:
            for key, v in routing_stats(r).items():
                if v.dim() == 0:
                    self.log(f"routing/{stage}/{name}/{key}", v)
                else:
                    for e, x in enumerate(v.tolist()):
                        self.log(f"routing/{stage}/{name}/{key}_e{e}", x)

    # -- evaluation: exact per-token loss, bits per byte, word-level perplexity from summed counts
    def _table(self) -> torch.Tensor | None:
        if self.token_table is None and self.tokenizer is not None:
            from apps.lm.tokenizers import token_byte_table

            table = torch.tensor(token_byte_table(self.tokenizer), dtype=torch.long)  # (V, 4)
            self.token_table = table.to(self.device)
        return self.token_table

    def _eval_sums(self, out: LMOutput, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[summed nll of scored targets, scored targets, their UTF-8 bytes, words they start]`` (float64).

        Targets equal to ``apps.lm.data.IGNORE_INDEX`` (context-only positions of a sliding window) are not
        scored. Bytes and words come from the token table: a target starts a word inside itself, or at its
        first byte when that byte is not whitespace and the previous token (its input ``x``) ends in
        whitespace.
        """
        logits = out.logits.float()  # (B, T, V)
        nll = F.cross_entropy(
            logits.transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, T)
        scored = y != IGNORE_INDEX  # (B, T)
        sums = [nll.sum(), scored.sum()]
        table = self._table()
        if table is not None:
            t = table[y.clamp_min(0)] * scored[..., None]  # (B, T, 4)
            prev_space = table[x][..., 3]  # (B, T) the previous token ends in whitespace
            sums += [t[..., 0].sum(), (t[..., 1] + t[..., 2] * prev_space).sum()]
        else:
            sums += [nll.new_zeros(()), nll.new_zeros(())]
        return torch.stack([v.to(torch.float64) for v in sums])

    def _eval_start(self, stage: str) -> None:
        self._acc[stage] = torch.zeros(4, dtype=torch.float64, device=self.device)

    def _eval_end(self, stage: str) -> None:
        acc = self._acc.pop(stage, None)
        if acc is None:
            return
        if self._trainer is not None:
            acc = self.trainer.strategy.reduce(acc, reduce_op="sum")  # (4,) over ranks
        nll, tokens, nbytes, words = acc.tolist()
        if tokens <= 0:
            return
        metrics = eval_metrics(nll, tokens, nbytes, words if self.word_ppl else 0.0)
        for k, v in metrics.items():
            self.log(f"{stage}/{k}", v, prog_bar=k in ("loss", "bpb"), sync_dist=False)

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self._acc["val"] += self._eval_sums(out, x, y)
        terms = self._losses(out, y.clamp_min(0))
        self.log("val/balance", terms["balance"], on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        for name, r in out.routings:
            self.log(
                f"routing/val/{name}/active_experts",
                routing_stats(r)["active_experts"],
                on_epoch=True,
                batch_size=x.shape[0],
                sync_dist=True,
            )

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self._acc["test"] += self._eval_sums(self(x), x, y)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # -- predict: ``moekit lm predict`` scores held-out text; ``moekit lm generate`` continues a prompt
    @torch.no_grad()
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per-window scores: mean next-token ``nll`` (nats), ``perplexity`` = exp(nll), ``tokens`` scored
        and the window's ``text`` (decoded input, when the tokenizer is known). Text continuation is
        ``moekit lm generate``."""
        x, y = batch if isinstance(batch, list | tuple) else (batch[:, :-1], batch[:, 1:])  # (B, T)
        logits = self(x).logits.float()  # (B, T, V)
        scored = y != IGNORE_INDEX  # (B, T) sliding windows score only their last stride targets
        per = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none")
        n = scored.sum(-1)  # (B,)
        nll = per.sum(-1) / n.clamp_min(1)  # (B,)
        out: dict[str, Any] = {"nll": nll, "perplexity": nll.exp(), "tokens": n}
        if self.tokenizer is not None:
            out["text"] = [self.tokenizer.decode(row) for row in x.tolist()]
        return out

    # -- optimisation
    # -----------------------------------------------------------------------------------------
    def _param_groups(self) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
        """``(decay, no_decay)`` named parameters in optimizer order: matrices get weight decay, norms not."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [(n, p) for n, p in named if p.dim() >= 2], [(n, p) for n, p in named if p.dim() < 2]

    def configure_optimizers(self):
        decay_named, no_decay_named = self._param_groups()
        decay, no_decay = [p for _, p in decay_named], [p for _, p in no_decay_named]
        fused = self.fused_optimizer
        if fused is None:
            params = decay + no_decay
            fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=self.betas,
                                fused=fused or None)
        total = self.decay_steps
        if (
            total is None
            and self._trainer is not None
            and self.trainer.max_steps
            and self.trainer.max_steps > 0
        ):
            total = self.trainer.max_steps - self.warmup_steps
        warm, floor = max(self.warmup_steps, 0), self.min_lr / self.lr

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if not total or total <= 0:
                return 1.0
            u = min((step - warm) / total, 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * u))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoint extras
    # --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["lm_tokenizer"] = self.tokenizer.to_json()
        if self.model is not None:
            checkpoint["lm_params"] = count_parameters(self.model)
        # stochastic routers (Gumbel DTS gate, noisy top-k, jitter) and dropout draw from the global RNG:
        # store it so that a resumed run draws the same noise as an uninterrupted one
        checkpoint["lm_rng"] = {"torch": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model is None:
            cfg = checkpoint.get("hyper_parameters", {}).get("config")
            cfg = as_lm_config(cfg) if cfg is not None else None
            if cfg is not None and cfg.vocab_size is not None:
                self.config = cfg
                self.model = TransformerLM(config=cfg)
        self._upgrade_legacy_checkpoint(checkpoint)
        if "lm_rng" in checkpoint and self._trainer is not None:
            torch.set_rng_state(checkpoint["lm_rng"]["torch"])
        if "lm_tokenizer" in checkpoint and self.tokenizer is None:
            from apps.lm.tokenizers import tokenizer_from_json

            self.tokenizer = tokenizer_from_json(checkpoint["lm_tokenizer"])

    def _upgrade_legacy_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written while the LM had its own SwiGLU (``ffn.w1/w2/w3``, ``nn.Linear`` layout) load
        into the moe_core layers: the weights are renamed and transposed
        (``apps.lm.model.upgrade_state_dict``) and so are their AdamW moments, so that training resumes
        exactly. Lightning calls this hook before it loads the state dict and the optimizer states."""
        self._fuse_two_parameter_banks(checkpoint)
        renamed = upgrade_state_dict(checkpoint.get("state_dict", {}))
        if not renamed or self.model is None:
            return
        index = {n: i for i, (n, _) in enumerate(self._param_groups()[0])}  # decay group: ids 0..n-1
        for opt in checkpoint.get("optimizer_states", []):
            for new in renamed.values():
                state = opt.get("state", {}).get(index.get(new, -1), {})
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and v.dim() == 2:
                        state[k] = v.t().contiguous()  # exp_avg, exp_avg_sq: (out, in) -> (in, out)

    def _fuse_two_parameter_banks(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written while SwiGLU expert banks stored ``gate_proj`` and ``up_proj`` ``(E, D, H)`` as
        two parameters resume exactly: their AdamW moments are concatenated (gate first) into those of
        ``gate_up_proj (E, D, 2H)`` and the optimizer ids after each fused bank shift down by one, in both
        parameter groups. The weights themselves are fused by ``SwiGLUExperts._load_from_state_dict``."""
        sd = checkpoint.get("state_dict", {})
        # the model's banks (only SwiGLUExperts has a gate_up_proj; a dense shared expert keeps gate/up_proj)
        banks = {n.removesuffix("gate_up_proj") for n, _ in self.named_parameters()
                 if n.endswith(".gate_up_proj")}  # fmt: skip
        banks = {b for b in banks if b + "gate_proj" in sd and b + "up_proj" in sd}
        if not banks:
            return
        decay_named, no_decay_named = self._param_groups()
        new = [n for n, _ in decay_named]
        decay, no_decay = len(new), len(no_decay_named)
        old: list[str] = []
        for n in new:
            base = n.removesuffix("gate_up_proj")
            old += [base + "gate_proj", base + "up_proj"] if base in banks else [n]
        index = {n: i for i, n in enumerate(old)}
        for opt in checkpoint.get("optimizer_states", []):
            groups, state = opt.get("param_groups", []), opt.get("state", {})
            if len(groups) != 2 or len(groups[0]["params"]) != len(old):
                continue  # not this task's optimizer layout: leave it to Lightning's own check
            fused: dict[int, dict] = {}
            for i, n in enumerate(new):
                base = n.removesuffix("gate_up_proj")
                if base in banks:
                    g, u = state.get(index[base + "gate_proj"]), state.get(index[base + "up_proj"])
                    if g is not None and u is not None:
                        fused[i] = {k: torch.cat([v, u[k]], dim=-1) if k in ("exp_avg", "exp_avg_sq") else v
                                    for k, v in g.items()}  # fmt: skip
                elif index[n] in state:
                    fused[i] = state[index[n]]
            for j in range(no_decay):
                if len(old) + j in state:
                    fused[decay + j] = state[len(old) + j]
            opt["state"] = fused
            groups[0]["params"] = list(range(decay))
            groups[1]["params"] = list(range(decay, decay + no_decay))


def eval_metrics(nll_sum: float, tokens: float, nbytes: float, words: float = 0.0) -> dict[str, float]:
    """Evaluation metrics from summed counts (nats).

    ``loss = nll / tokens`` (per token), ``ppl = exp(loss)``, bits per byte ``bpb = nll / (ln 2 * bytes)``
    (tokenizer-independent: the same text costs the same bits whatever the vocabulary), word-level perplexity
    ``word_ppl = exp(nll / words)`` when ``words > 0``.
    """
    out = {"loss": nll_sum / tokens, "ppl": math.exp(min(nll_sum / tokens, 700.0))}
    if nbytes > 0:
        out["bpb"] = nll_sum / (math.log(2.0) * nbytes)
    if words > 0:
        out["word_ppl"] = math.exp(min(nll_sum / words, 700.0))
    return out


def training_flops_per_token(model: TransformerLM) -> float:
    """FLOPs of one training token (forward + backward): ``6 * active parameters + 12 * L * D * T``
    (Kaplan et al. 2020 / PaLM appendix B accounting; the attention-score term with the full context T).

    Active parameters count only the experts a token uses (``count_parameters``: k of E routed experts, CoE
    iterations with multiplicity); the tied embedding is counted once (the output head's matmul; the lookup is
    free).
    """
    cfg = model.config
    active = count_parameters(model)["active"]
    if not cfg.tie_embeddings:
        active -= model.embed.weight.numel()  # the input lookup does no matmul
    return 6.0 * active + 12.0 * cfg.n_layers * cfg.dim * cfg.context_len


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """Achieved FLOP/s of a large ``n x n`` matmul on ``device`` (best of 3 after a warm-up): the peak the
    MFU is measured against on this machine."""
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # no draw from the global RNG (exact resume)
    b = torch.full((n, n), 0.25, device=device, dtype=dtype)

    def sync() -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize(device)

    a @ b
    sync()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-12)
