"""Text generation from a trained LM checkpoint: greedy, temperature, top-k and top-p (nucleus) sampling,
seeded, optionally with C3PO re-mixed routing (arXiv 2504.07964) applied at every decoding step. The command
line is ``moekit lm generate`` (:func:`apps.lm.commands.generate`).
"""

from __future__ import annotations

import logging
import pickle
import re
from contextlib import nullcontext
from pathlib import Path

import torch

from apps.lm.model import TransformerLM
from moe_core.inference.c3po import Positions, c3po_override

log = logging.getLogger(__name__)


def _filter_logits(logits: torch.Tensor, *, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits ``(B, V)`` -> logits with everything outside the top-k / nucleus set to -inf."""
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sl, si = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sl.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        drop = before > top_p  # keep the smallest prefix whose mass reaches top_p (first token always kept)
        sl = sl.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, si, sl)
    return logits


@torch.no_grad()
def generate(
    model: TransformerLM,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = 0,
    routing_pathway: torch.Tensor | None = None,
    routing_blocks: list[int] | None = None,
    routing_positions: Positions = "generated",
) -> str:
    """Continue ``prompt``; returns the prompt plus the generated text.

    Args:
        model: the network (switched to eval mode for the call and restored afterwards).
        tokenizer: an ``apps.lm.tokenizers`` tokenizer.
        prompt: text to continue (non-empty).
        max_new_tokens: tokens to sample.
        temperature: softmax temperature (> 0) for sampling.
        top_k: keep only the k most likely tokens.
        top_p: keep the smallest set of tokens whose probability reaches p.
        greedy: take the argmax (ignores temperature, top_k, top_p).
        seed: seed of a private ``torch.Generator`` (same seed, same text); None = unseeded.
        routing_pathway: C3PO: an ``(L, E)`` re-mixed routing distribution (e.g. from
            ``moe_core.inference.c3po.kernel_regression`` or ``mode_finding``) that replaces the router's
            pre-top-k distribution in ``routing_blocks`` at every decoding step; None: own routing.
        routing_blocks: the L MoE block positions of ``routing_pathway`` (default: the last L blocks).
        routing_positions: ``generated`` (the prompt's last token and every generated one: the tokens the
            official C3PO code overrides), ``all`` tokens of the window, or the ``last`` one.
    """
    if not prompt:
        raise ValueError("prompt must be a non-empty string")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    blocks: list[int] = []
    if routing_pathway is not None:
        if routing_pathway.dim() != 2:
            raise ValueError(f"routing_pathway must have shape (L, E), got {tuple(routing_pathway.shape)}")
        n = routing_pathway.shape[0]
        blocks = list(routing_blocks) if routing_blocks is not None else list(range(-n, 0))
    param = next(model.parameters())
    gen = torch.Generator(device=param.device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=param.device)  # (1, T0)
    prompt_len = idx.shape[1]
    was_training = model.training
    model.eval()
    try:
        ctx = model.config.context_len
        for _ in range(max_new_tokens):
            window = idx[:, -ctx:]  # (1, T)
            override = (
                nullcontext()
                if routing_pathway is None
                else c3po_override(
                    model,
                    routing_pathway[None].to(param.device),
                    blocks=blocks,
                    seq_len=window.shape[1],
                    positions=routing_positions,
                    start=prompt_len - 1 - (idx.shape[1] - window.shape[1]),  # prompt end in window coords
                )
            )
            with override:
                logits = model(window).logits[:, -1, :].float()  # (1, V)
            if greedy:
                nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
            else:
                logits = _filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)  # (1, 1)
            idx = torch.cat([idx, nxt], dim=1)
    finally:
        model.train(was_training)
    return tokenizer.decode(idx[0].tolist())


def load_checkpoint(path: str | Path):
    """Model and tokenizer from a checkpoint written by :class:`apps.lm.task.LMTask`.

    The file is read with ``torch.load(weights_only=True)``: plain data, tensors and the types the lm app
    registers with ``torch.serialization.add_safe_globals`` (its :class:`~apps.lm.model.LMConfig`); a file
    whose pickle names anything else is refused with a ``ValueError`` and nothing of it runs.
    """
    from apps.lm.task import LMTask

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # torch names the first global it refused
        detail = f"it names {found.group(1)}" if found else str(e).strip().splitlines()[0]
        raise ValueError(
            f"checkpoint {p}: refused by torch.load(weights_only=True): {detail}, outside the allow-list; "
            "unpickling it could run code from the file, so nothing of it was loaded"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {p} is not a Lightning checkpoint (no state_dict)")
    # LightningCLI (``moekit lm fit``) stores an ``_instantiator`` that re-parses the hyper-parameters with
    # jsonargparse; its checkpoints from before the config was kept as a mapping there hold an LMConfig
    # object, which that parser cannot take. LMTask takes its saved arguments directly (object or mapping)
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
    try:
        task = LMTask(**hparams)
    except TypeError as e:
        raise ValueError(f"checkpoint {p}: its hyper-parameters do not fit apps.lm.task.LMTask: {e}") from e
    task.on_load_checkpoint(ckpt)
    if task.model is not None:
        task.load_state_dict(ckpt["state_dict"])
    if task.model is None or task.tokenizer is None:
        raise ValueError(
            f"checkpoint {p} carries no model config or tokenizer (was it written by apps.lm.task.LMTask?)"
        )
    return task.model.eval(), task.tokenizer
