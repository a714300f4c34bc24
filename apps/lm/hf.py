"""Hugging Face interop of the LM: Mixtral (arXiv 2401.04088), Qwen2-MoE (shared expert), OLMoE (arXiv
2409.02060) and Qwen3-MoE checkpoints to and from :class:`apps.lm.model.TransformerLM`.

:func:`from_hf` builds a moekit LM with the same function as a transformers MoE causal LM (so a user can
continue pretraining it with ``moekit lm fit``); :func:`to_hf` builds the transformers model of a moekit LM of
a matching architecture, and :func:`export_hf` writes it as a transformers directory (``config.json``,
``model.safetensors``, tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads.

Layout differences handled here [D]:

* RoPE: transformers rotates dimension ``j`` with ``j + hd/2`` (``rotate_half``), moekit rotates the pair
  ``(2j, 2j+1)``. The query and key rows of every head are permuted (``_half_to_pairs``); attention scores are
  unchanged (the same permutation on q and k, the same frequency per pair), so are q/k biases and q/k norm
  weights (permuted alike).
* Fused ``qkv`` (moekit) vs ``q_proj``/``k_proj``/``v_proj``; expert banks ``gate_up_proj (E, D, 2H)`` /
  ``down_proj (E, H, D)`` (moekit ``x @ W``) vs ``gate_up_proj (E, 2H, D)`` / ``down_proj (E, D, H)``.
* Qwen2-MoE's shared expert always has a sigmoid gate. A moekit shared expert without gate (DeepSeekMoE) is
  exported with a zero gate (``sigmoid(0) = 1/2``) and a doubled down projection: exact in floating point.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from apps.lm.model import LMConfig, TransformerLM

log = logging.getLogger(__name__)

Family = Literal["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"]
FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe")


def _half_to_pairs(head_dim: int) -> torch.Tensor:
    """Row order that turns a head's ``rotate_half`` layout into moekit's interleaved pairs:
    ``moekit[2j] = hf[j]``, ``moekit[2j+1] = hf[j + hd/2]``."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)  # (hd,)


def _permute_heads(w: torch.Tensor, n: int, hd: int, inverse: bool = False) -> torch.Tensor:
    """Permute the rows (dim 0) of ``w`` ``(n*hd, ...)`` within each of the n heads."""
    perm = _half_to_pairs(hd)
    if inverse:
        perm = torch.argsort(perm)
    idx = (torch.arange(n)[:, None] * hd + perm[None, :]).reshape(-1)  # (n*hd,)
    return w.index_select(0, idx)


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _rope_theta(cfg: Any) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    kind = rp.get("rope_type", "default") if isinstance(rp, dict) else "default"
    if kind != "default":
        raise ValueError(f"RoPE type {kind!r} is not supported (only the default rotary embedding)")
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta if theta is not None else _get(cfg, "rope_theta", default=10000.0))


def lm_config_from_hf(cfg: Any, *, context_len: int | None = None) -> LMConfig:
    """The :class:`LMConfig` of a transformers Mixtral / Qwen2-MoE / OLMoE / Qwen3-MoE config.

    Raises:
        ValueError: an unsupported model type or feature (sliding window, non-default RoPE, another
            activation, a head width other than ``hidden_size / num_attention_heads``).
    """
    family = cfg.model_type
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    d, h = cfg.hidden_size, cfg.num_attention_heads
    head_dim = _get(cfg, "head_dim", default=d // h)
    if head_dim * h != d:
        raise ValueError(f"head_dim={head_dim} with {h} heads != hidden_size={d}: not supported")
    if _get(cfg, "hidden_act", default="silu") != "silu":
        raise ValueError(f"hidden_act={cfg.hidden_act!r}: only silu (SwiGLU experts) is supported")
    sliding = family == "mixtral" or _get(cfg, "use_sliding_window", default=False)
    if _get(cfg, "sliding_window") and sliding:
        raise ValueError("sliding-window attention is not supported (set sliding_window to null)")
    if _get(cfg, "clip_qkv") is not None:
        raise ValueError("clip_qkv is not supported")
    e = _get(cfg, "num_local_experts", "num_experts")
    k = cfg.num_experts_per_tok
    first, every = _sparse_pattern(
        cfg.num_hidden_layers, _get(cfg, "decoder_sparse_step", default=1), _get(cfg, "mlp_only_layers") or []
    )
    renorm = True if family == "mixtral" else bool(_get(cfg, "norm_topk_prob", default=False))
    expert_hidden = cfg.intermediate_size if family in ("mixtral", "olmoe") else cfg.moe_intermediate_size
    shared = family == "qwen2_moe" and _get(cfg, "shared_expert_intermediate_size", default=0) > 0
    return LMConfig(
        vocab_size=cfg.vocab_size,
        context_len=context_len or min(int(_get(cfg, "max_position_embeddings", default=4096)), 4096),
        dim=d, n_layers=cfg.num_hidden_layers, n_heads=h,
        n_kv_heads=_get(cfg, "num_key_value_heads", default=h),
        attn_bias=family == "qwen2_moe" and bool(_get(cfg, "qkv_bias", default=True)),
        qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(family, "none"),
        norm_eps=float(cfg.rms_norm_eps), ffn_hidden=cfg.intermediate_size, ffn="moe",
        first_dense_layers=first, moe_every=every, num_experts=e, top_k=k, expert_hidden=expert_hidden,
        num_shared_experts=1 if shared else 0,
        shared_expert_hidden=cfg.shared_expert_intermediate_size if shared else None, shared_gate=shared,
        router="topk", router_kwargs={"renormalize": renorm}, dropout=0.0,
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False)), rope_base=_rope_theta(cfg),
    )  # fmt: skip


def _sparse_pattern(n_layers: int, step: int, mlp_only: list[int]) -> tuple[int, int]:
    """moekit's ``(first_dense_layers, moe_every)`` for transformers' sparse layers: ``i`` not in
    ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0`` (Qwen2/3-MoE).

    Raises:
        ValueError: no MoE layer, or sparse layers that are not one run ``first, first + every, ...``
            to the last layer.
    """
    sparse = [i for i in range(n_layers) if i not in set(mlp_only) and (i + 1) % step == 0]
    if not sparse:
        raise ValueError(f"no MoE layer (decoder_sparse_step={step}, mlp_only_layers={mlp_only})")
    first = sparse[0]
    every = sparse[1] - sparse[0] if len(sparse) > 1 else n_layers - first
    if sparse != list(range(first, n_layers, every)):
        raise ValueError(
            f"sparse layers {sparse} (decoder_sparse_step={step}, mlp_only_layers={mlp_only}): moekit needs "
            "dense layers first, then one MoE layer every moe_every layers up to the last"
        )
    return first, every


def _linear_t(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


def from_hf(hf_model: nn.Module, *, context_len: int | None = None) -> TransformerLM:
    """A :class:`TransformerLM` computing the same logits as a transformers MoE causal LM (float32 weights
    copied; the router, experts and shared expert mapped one to one)."""
    cfg = hf_model.config
    lm_cfg = lm_config_from_hf(cfg, context_len=context_len)
    sd = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    h, kv, hd = lm_cfg.n_heads, lm_cfg.kv_heads, lm_cfg.dim // lm_cfg.n_heads
    out: dict[str, torch.Tensor] = {
        "embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]
    }  # fmt: skip
    if not lm_cfg.tie_embeddings:
        out["head.weight"] = sd["lm_head.weight"]
    for i in range(lm_cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "norm1.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "norm2.weight"] = sd[p + "post_attention_layernorm.weight"]
        a = p + "self_attn."
        out[q + "attn.qkv.weight"] = torch.cat([
            _permute_heads(sd[a + "q_proj.weight"], h, hd), _permute_heads(sd[a + "k_proj.weight"], kv, hd),
            sd[a + "v_proj.weight"],
        ])  # fmt: skip
        if lm_cfg.attn_bias:
            out[q + "attn.qkv.bias"] = torch.cat([
                _permute_heads(sd[a + "q_proj.bias"], h, hd), _permute_heads(sd[a + "k_proj.bias"], kv, hd),
                sd[a + "v_proj.bias"],
            ])  # fmt: skip
        if lm_cfg.qk_norm == "full":
            out[q + "attn.q_norm.weight"] = _permute_heads(sd[a + "q_norm.weight"], h, hd)
            out[q + "attn.k_norm.weight"] = _permute_heads(sd[a + "k_norm.weight"], kv, hd)
        elif lm_cfg.qk_norm == "head":
            out[q + "attn.q_norm.weight"] = _permute_heads(sd[a + "q_norm.weight"], 1, hd)
            out[q + "attn.k_norm.weight"] = _permute_heads(sd[a + "k_norm.weight"], 1, hd)
        out[q + "attn.proj.weight"] = sd[a + "o_proj.weight"]
        m, f = p + "mlp.", q + "ffn."
        if lm_cfg.sparse_layer(i):
            out[f + "router.gate.weight"] = sd[m + "gate.weight"]
            gu, down = sd[m + "experts.gate_up_proj"], sd[m + "experts.down_proj"]  # (E, 2H, D), (E, D, H)
            # both store the gate rows/columns first: a transpose is the whole conversion
            out[f + "experts.gate_up_proj"] = gu.transpose(1, 2).contiguous()  # (E, D, 2H)
            out[f + "experts.down_proj"] = down.transpose(1, 2).contiguous()  # (E, H, D)
            if lm_cfg.num_shared_experts:
                for n in ("gate_proj", "up_proj", "down_proj"):
                    out[f + f"shared_experts.{n}"] = _linear_t(sd[m + f"shared_expert.{n}.weight"])
                out[f + "shared_gate.weight"] = sd[m + "shared_expert_gate.weight"]
        else:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[f + n] = _linear_t(sd[m + f"{n}.weight"])
    model = TransformerLM(config=lm_cfg)
    missing, unexpected = model.load_state_dict(out, strict=False)
    missing = [k for k in missing if not (lm_cfg.tie_embeddings and k == "head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def _family_of(cfg: LMConfig) -> Family:
    if cfg.qk_norm == "full":
        return "olmoe"
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if cfg.attn_bias or cfg.num_shared_experts or cfg.first_dense_layers or cfg.moe_every != 1:
        return "qwen2_moe"
    return "mixtral" if cfg.router_kwargs.get("renormalize", cfg.top_k > 1) else "qwen2_moe"


def hf_config_for(cfg: LMConfig, family: Family | None = None) -> Any:
    """The transformers config of a moekit LM (``family`` None: chosen from the architecture).

    Raises:
        ValueError: the architecture has no transformers counterpart (another FFN or router kind, router
            options other than renormalisation, MoA/SMHA attention, a dense-layer pattern the family cannot
            express).
    """
    import transformers

    family = family or _family_of(cfg)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    problems = []
    if cfg.ffn != "moe":
        problems.append(f"ffn={cfg.ffn!r} (need 'moe')")
    if cfg.router != "topk" or set(cfg.router_kwargs) - {"renormalize"}:
        problems.append(f"router={cfg.router!r} with {cfg.router_kwargs} (need plain 'topk')")
    if cfg.attention != "mha":
        problems.append(f"attention={cfg.attention!r}")
    renorm = bool(cfg.router_kwargs.get("renormalize", cfg.top_k > 1))
    if family in ("mixtral", "olmoe") and (cfg.first_dense_layers or cfg.moe_every != 1):
        problems.append(f"{family} has no dense layers")
    if family == "mixtral" and not renorm:
        problems.append("mixtral renormalises the top-k weights")
    if cfg.num_shared_experts and family != "qwen2_moe":
        problems.append(f"shared experts need qwen2_moe, not {family}")
    if cfg.attn_bias and family != "qwen2_moe":
        problems.append(f"attn_bias=True: {family} has no q/k/v bias")
    want_norm = {"olmoe": "full", "qwen3_moe": "head"}.get(family, "none")
    if cfg.qk_norm != want_norm:
        problems.append(f"qk_norm={cfg.qk_norm!r} but {family} uses {want_norm!r}")
    if problems:
        raise ValueError(f"cannot export as {family}: " + "; ".join(problems))
    eps = cfg.norm_eps if cfg.norm_eps is not None else torch.finfo(torch.float32).eps
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, rms_norm_eps=eps,
        max_position_embeddings=cfg.context_len, tie_word_embeddings=cfg.tie_embeddings,
        num_experts_per_tok=cfg.top_k, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    h = cfg.resolved_expert_hidden
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=h, num_local_experts=cfg.num_experts,
                                          sliding_window=None, router_jitter_noise=0.0)
    if family == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=h, num_experts=cfg.num_experts,
                                        norm_topk_prob=renorm)
    # any dense-layer pattern: every non-MoE layer listed in mlp_only_layers
    dense = [i for i in range(cfg.n_layers) if not cfg.sparse_layer(i)]
    moe = dict(moe_intermediate_size=h, intermediate_size=cfg.ffn_hidden, num_experts=cfg.num_experts,
               norm_topk_prob=renorm, decoder_sparse_step=1, mlp_only_layers=dense)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, **moe, head_dim=cfg.dim // cfg.n_heads)
    shared = (cfg.shared_expert_hidden or cfg.num_shared_experts * h) if cfg.num_shared_experts else 0
    return transformers.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=shared,
                                       qkv_bias=cfg.attn_bias, use_sliding_window=False)


def to_hf(model: TransformerLM, family: Family | None = None) -> nn.Module:
    """The transformers causal LM with the same logits as ``model`` (float32)."""
    import transformers

    cfg = model.config
    hf_cfg = hf_config_for(cfg, family)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    h, kv, hd = cfg.n_heads, cfg.kv_heads, cfg.dim // cfg.n_heads
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["head.weight"]}  # fmt: skip
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = sd[q + "norm1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "norm2.weight"]
        a = p + "self_attn."
        wq, wk, wv = sd[q + "attn.qkv.weight"].split([h * hd, kv * hd, kv * hd])
        out[a + "q_proj.weight"] = _permute_heads(wq, h, hd, inverse=True)
        out[a + "k_proj.weight"] = _permute_heads(wk, kv, hd, inverse=True)
        out[a + "v_proj.weight"] = wv
        if cfg.attn_bias:
            bq, bk, bv = sd[q + "attn.qkv.bias"].split([h * hd, kv * hd, kv * hd])
            out[a + "q_proj.bias"] = _permute_heads(bq, h, hd, inverse=True)
            out[a + "k_proj.bias"] = _permute_heads(bk, kv, hd, inverse=True)
            out[a + "v_proj.bias"] = bv
        if cfg.qk_norm != "none":
            nq, nk = (h, kv) if cfg.qk_norm == "full" else (1, 1)
            out[a + "q_norm.weight"] = _permute_heads(sd[q + "attn.q_norm.weight"], nq, hd, inverse=True)
            out[a + "k_norm.weight"] = _permute_heads(sd[q + "attn.k_norm.weight"], nk, hd, inverse=True)
        out[a + "o_proj.weight"] = sd[q + "attn.proj.weight"]
        m, f = p + "mlp.", q + "ffn."
        if cfg.sparse_layer(i):
            out[m + "gate.weight"] = sd[f + "router.gate.weight"]
            gu, down = sd[f + "experts.gate_up_proj"], sd[f + "experts.down_proj"]  # (E, D, 2H), (E, H, D)
            out[m + "experts.gate_up_proj"] = gu.transpose(1, 2).contiguous()  # (E, 2H, D)
            out[m + "experts.down_proj"] = down.transpose(1, 2).contiguous()  # (E, D, H)
            if cfg.num_shared_experts:
                for n in ("gate_proj", "up_proj"):
                    out[m + f"shared_expert.{n}.weight"] = _linear_t(sd[f + f"shared_experts.{n}"])
                down_s = _linear_t(sd[f + "shared_experts.down_proj"])  # (D, Hs)
                if cfg.shared_gate:
                    out[m + "shared_expert_gate.weight"] = sd[f + "shared_gate.weight"]
                else:  # ungated shared expert: sigmoid(0) * (2 * down) == down exactly
                    out[m + "shared_expert_gate.weight"] = torch.zeros(1, cfg.dim)
                    down_s = 2.0 * down_s
                out[m + "shared_expert.down_proj.weight"] = down_s
        else:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[m + f"{n}.weight"] = _linear_t(sd[f + n])
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def export_hf(model: TransformerLM, out_dir: str | Path, *, tokenizer: Any = None,
              family: Family | None = None) -> Path:
    """Write ``model`` as a transformers directory (``config.json``, ``model.safetensors``, and with a BPE
    ``tokenizer`` its ``tokenizer.json`` + ``tokenizer_config.json``) that ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` load."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf(model, family)
    hf.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        from apps.lm.tokenizers import BPETokenizer, save_tokenizer

        if not isinstance(tokenizer, BPETokenizer):
            log.warning("tokenizer %s has no standard form: the directory has no tokenizer", tokenizer.kind)
        else:
            save_tokenizer(tokenizer, out / "tokenizer.json")
            tmp = out / ".tokenizer_config.json.tmp"
            tmp.write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length":
                                       model.config.context_len}), encoding="utf-8")
            os.replace(tmp, out / "tokenizer_config.json")
    log.info("exported %s (%s) to %s", type(hf).__name__, hf.config.model_type, out)
    return out


def import_hf(path: str | Path, *, context_len: int | None = None) -> tuple[TransformerLM, Any]:
    """Load a transformers directory (``from_pretrained``, safetensors, no remote code) as a moekit LM and its
    tokenizer (``tokenizer.json`` read as a moekit BPE tokenizer when present, else None)."""
    import transformers

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a transformers model directory (no config.json)")
    hf = transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, trust_remote_code=False,
                                                           use_safetensors=True)
    model = from_hf(hf, context_len=context_len)
    tok = None
    if (p / "tokenizer.json").is_file():
        from apps.lm.tokenizers import tokenizer_from_json

        tok = tokenizer_from_json((p / "tokenizer.json").read_text(encoding="utf-8"))
    return model, tok


def lm_checkpoint(model: TransformerLM, tokenizer: Any = None, **extra: Any) -> dict[str, Any]:
    """A checkpoint dict in the layout ``apps.lm.task.LMTask`` writes (``state_dict`` under ``model.``,
    ``hyper_parameters.config``, the tokenizer), loadable by ``moekit lm generate``, ``lm test --ckpt_path``
    and ``LMTask(init_weights=...)``."""
    import lightning

    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": dataclasses.replace(model.config)},
        "pytorch-lightning_version": lightning.__version__,
        **extra,
    }
    if tokenizer is not None:
        ckpt["lm_tokenizer"] = tokenizer.to_json()
    return ckpt
