"""Tool commands of the lm app: ``moekit lm generate``, ``lm merge``, ``lm quantize``, ``lm import``,
``lm export``.

Each command is a typed function parsed by jsonargparse (its signature gives the options, its docstring the
help) that calls library functions: :func:`apps.lm.generate.generate`,
:func:`moe_core.surgery.mcsmoe.merge_model` / :func:`~moe_core.surgery.mcsmoe.compress_model`,
:func:`moe_core.surgery.quant.quantize_model_experts`. Options keep the spellings the commands have always
accepted (``--max-new-tokens``; jsonargparse's ``--max_new_tokens`` works too), and a boolean option works as
a bare flag (``--greedy``) or with a value (``--greedy true``)::

    moekit lm generate --ckpt runs/lm/shakespeare_moe/last.ckpt --prompt "ROMEO:" --max-new-tokens 200 \\
        --temperature 0.8 --top-k 40 --seed 0
    moekit lm merge --model runs/lm/tiny/last.ckpt --num-groups 2 --out merged.ckpt  # run's own data
    moekit lm quantize --model runs/lm/tiny/last.ckpt --bits 4 --group-size 16 --out quantized.ckpt
    moekit lm merge --model moe.pt --calib calib_ids.pt --num-groups 4 --out merged.pt  # a pickled module
    moekit lm import --hf-dir path/to/OLMoE-1B-7B --out olmoe.ckpt      # transformers -> moekit
    moekit lm export --ckpt runs/lm/wikipedia_moe/last.ckpt --out-dir hf_model  # moekit -> transformers
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from jsonargparse import CLI
from torch import nn

from apps.lm.generate import generate as generate_text
from apps.lm.generate import load_checkpoint
from apps.lm.model import as_lm_config
from moe_core.blocks import find_moe_blocks
from moe_core.experts import SwiGLUExperts
from moe_core.surgery.mcsmoe import collect_routing_stats, compress_model, merge_model
from moe_core.surgery.quant import quantize_model_experts

log = logging.getLogger(__name__)

__all__ = ["export", "generate", "import_", "merge", "quantize"]

_BOOL_WORDS = {"true", "false", "yes", "no"}


def generate(argv: list[str] | None = None) -> None:
    """``moekit lm generate``: continue a prompt with a trained LM checkpoint; prints the text."""
    _run(generate_from_checkpoint, argv, prog="moekit lm generate")


def import_(argv: list[str] | None = None) -> None:
    """``moekit lm import``: a transformers MoE checkpoint (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE) as a moekit
    LM checkpoint."""
    _run(import_hf_model, argv, prog="moekit lm import")


def export(argv: list[str] | None = None) -> None:
    """``moekit lm export``: a moekit LM checkpoint as a transformers directory."""
    _run(export_hf_model, argv, prog="moekit lm export")


def import_hf_model(*, hf_dir: str, out: str, context_len: int | None = None) -> None:
    """Build a moekit LM from a transformers MoE model directory and write it as a moekit LM checkpoint.

    The checkpoint loads in ``moekit lm generate --ckpt``, ``moekit lm test --ckpt_path`` and, to continue
    pretraining, ``moekit lm fit --model.init_args.init_weights=CKPT`` with a config of the same architecture
    (printed as YAML on stdout). Read with ``from_pretrained(use_safetensors=True, trust_remote_code=False)``.

    Args:
        hf_dir: the transformers directory (``config.json``, ``model.safetensors``, optional
            ``tokenizer.json``).
        out: the checkpoint file to write.
        context_len: the moekit model's maximum sequence length (default: the model's
            ``max_position_embeddings``, at most 4096).
    """
    import dataclasses

    import yaml

    from apps.lm.hf import import_hf, lm_checkpoint

    model, tok = import_hf(hf_dir, context_len=context_len)
    ckpt = lm_checkpoint(model, tok, lm_imported_from=str(hf_dir))
    _save_atomic(ckpt, out)
    print(yaml.safe_dump({"model": {"class_path": "apps.lm.task.LMTask", "init_args": {
        "config": dataclasses.asdict(model.config), "init_weights": str(out)}}}, sort_keys=False))
    print(out)


def export_hf_model(*, ckpt: str, out_dir: str, family: str | None = None) -> None:
    """Write a moekit LM checkpoint (from ``lm fit``, ``lm merge``, ``lm quantize`` or ``lm import``) as a
    transformers directory (``config.json``, ``model.safetensors``, ``tokenizer.json``) that
    ``AutoModelForCausalLM.from_pretrained`` loads.

    Args:
        ckpt: the moekit LM checkpoint.
        out_dir: the directory to write.
        family: ``mixtral``, ``qwen2_moe``, ``olmoe`` or ``qwen3_moe`` (default: chosen from the architecture:
            per-head q/k norm -> qwen3_moe, full q/k norm -> olmoe, shared experts / qkv bias / dense layers /
            unnormalised top-k -> qwen2_moe, else mixtral).
    """
    from apps.lm.hf import export_hf

    model, tok = load_checkpoint(ckpt)
    print(export_hf(model, out_dir, tokenizer=tok, family=family))


def _save_atomic(obj: object, out: str | Path) -> None:
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, out)


def merge(argv: list[str] | None = None) -> None:
    """``moekit lm merge``: MC-SMoE merge (and optional LoSparse compression) of a lm fit checkpoint or a
    saved MoE model."""
    _run(merge_saved_model, argv, prog="moekit lm merge")


def quantize(argv: list[str] | None = None) -> None:
    """``moekit lm quantize``: bit-nested INT8 quantisation of the experts of a lm fit checkpoint or a saved
    MoE model."""
    _run(quantize_saved_model, argv, prog="moekit lm quantize")


def generate_from_checkpoint(
    *,
    ckpt: str,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = 0,
) -> str:
    """Continue a prompt with a trained LM checkpoint; prints and returns the prompt plus its continuation.

    Args:
        ckpt: checkpoint written by ``apps.lm.task.LMTask`` (e.g. ``last.ckpt``); it carries the tokenizer.
        prompt: text to continue.
        max_new_tokens: tokens to sample.
        temperature: softmax temperature (> 0) for sampling.
        top_k: keep only the k most likely tokens.
        top_p: keep the smallest set of tokens whose probability reaches p (nucleus sampling).
        greedy: argmax decoding (ignores temperature, top_k, top_p).
        seed: seed of the sampler (same seed, same text); null: unseeded.
    """
    model, tok = load_checkpoint(ckpt)
    text = generate_text(model, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, greedy=greedy, seed=seed)
    print(text)
    return text


def merge_saved_model(
    *,
    model: str,
    num_groups: int,
    out: str,
    calib: str | None = None,
    calib_windows: int = 64,
    rank: int = 0,
    keep_ratio: float = 0.1,
    batch_size: int = 16,
) -> None:
    """MC-SMoE merge (arXiv 2310.01334) of a trained MoE LM, then optional low-rank + sparse compression.

    Args:
        model: a checkpoint written by ``moekit lm fit`` (``.ckpt``), or a whole pickled ``nn.Module``
            (``torch.save(model)``) built from moekit and ``torch.nn`` modules (read with
            ``torch.load(weights_only=True)``; see :func:`load_saved_model`).
        num_groups: experts left per MoE block after merging.
        out: the output file. From a ``lm fit`` checkpoint: a checkpoint of the same architecture holding the
            merged model's function (each router slot holds its group's merged expert), which ``moekit lm
            generate``, ``lm test --ckpt_path`` and ``lm export`` load; from a pickled module: ``torch.save``.
        calib: a saved ``(B, T)`` long tensor of calibration token ids; default for a checkpoint: the first
            ``calib_windows`` validation windows of the run's own data (its data module's settings).
        calib_windows: calibration windows taken from the run's data when ``calib`` is not given.
        rank: LoSparse rank of the compression (0: no compression).
        keep_ratio: fraction of sparse entries kept by the compression.
        batch_size: calibration sequences per forward pass.
    """
    ckpt = _read_lm_checkpoint(model)
    net = _checkpoint_model(ckpt, model) if ckpt is not None else load_saved_model(model).eval()
    _require_moe(net, model, "merge")
    if calib is not None:
        ids = _load_tensor(calib)
    elif ckpt is not None:
        ids = _run_calibration_ids(ckpt, model, calib_windows)
    else:
        raise ValueError(f"{model} is a pickled module without its data: pass --calib (a (B, T) id tensor)")
    assignment = merge_model(net, collect_routing_stats(net, ids.split(batch_size)), num_groups=num_groups)
    if rank > 0:
        compress_model(net, rank=rank, keep_ratio=keep_ratio)
    if ckpt is None:
        torch.save(net, out)
    else:
        meta = {"kind": "mcsmoe_merge", "num_groups": num_groups, "rank": rank, "keep_ratio": keep_ratio,
                "calibration_windows": int(ids.shape[0]), "groups": [a.tolist() for a in assignment]}
        _write_lm_checkpoint(ckpt, net, out, meta)
    log.info("merged model written to %s", out)
    print(out)


def quantize_saved_model(
    *, model: str, out: str, bits: int = 8, group_size: int | None = None
) -> None:
    """Bit-nested INT8 quantisation of a trained MoE LM's experts (every bit width read from one code).

    Args:
        model: a checkpoint written by ``moekit lm fit`` (``.ckpt``), or a whole pickled ``nn.Module``
            (``torch.save(model)``) built from moekit and ``torch.nn`` modules (read with
            ``torch.load(weights_only=True)``; see :func:`load_saved_model`).
        out: the output file. From a ``lm fit`` checkpoint: a checkpoint of the same architecture whose expert
            weights are the dequantised ``bits``-bit codes (the function the quantised model computes), which
            ``moekit lm generate``, ``lm test --ckpt_path`` and ``lm export`` load; from a pickled module:
            ``torch.save`` of the quantised module.
        bits: bit width the experts run at (1..8).
        group_size: quantisation group along the input dimension (null: one scale per output row).

    Raises:
        ValueError: the model has no MoE layer (nothing to quantise).
    """
    ckpt = _read_lm_checkpoint(model)
    net = _checkpoint_model(ckpt, model) if ckpt is not None else load_saved_model(model).eval()
    _require_moe(net, model, "quantize")
    banks = quantize_model_experts(net, bits=bits, group_size=group_size)
    storage = sum(b.storage_bytes() for b in banks)
    log.info("expert storage at %d bits: %d bytes", bits, storage)
    if ckpt is None:
        torch.save(net, out)
    else:
        meta = {"kind": "nested_int8", "bits": bits, "group_size": group_size}
        meta["expert_storage_bytes"] = storage
        _write_lm_checkpoint(ckpt, net, out, meta)
    print(out)


def _require_moe(net: nn.Module, path: str, what: str) -> None:
    if not find_moe_blocks(net):
        raise ValueError(f"{path}: the model has no MoE layer, nothing to {what} (a dense model?)")


def _read_lm_checkpoint(path: str | Path) -> dict | None:
    """The checkpoint dict if ``path`` is a ``moekit lm fit`` checkpoint (read weights-only), else None."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file {p} not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return None  # a pickled module (or a refused file): load_saved_model decides
    if isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj:
        cfg = obj["hyper_parameters"].get("config")
        if cfg is None or as_lm_config(cfg).vocab_size is None:
            raise ValueError(f"checkpoint {p} has no model config with a vocab_size: not a lm fit checkpoint")
        return obj
    if isinstance(obj, dict):
        raise ValueError(f"checkpoint {p} is not a moekit lm fit checkpoint (no state_dict/hyper_parameters)")
    return None


def _checkpoint_model(ckpt: dict, path: str | Path) -> nn.Module:
    from apps.lm.model import TransformerLM

    net = TransformerLM(config=as_lm_config(ckpt["hyper_parameters"]["config"]))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: weights do not fit its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return net.eval()


def _run_calibration_ids(ckpt: dict, path: str | Path, windows: int) -> torch.Tensor:
    """``(n, T)`` validation windows of the data the run trained on (its data module's saved settings)."""
    from apps.lm.data import LMDataModule

    hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if not hp:
        raise ValueError(f"checkpoint {path} does not record its data module: pass --calib (a (B, T) tensor)")
    hp["max_val_windows"] = windows
    dm = LMDataModule(**hp)
    dm.setup()
    ids = torch.stack([dm.val_dataloader().dataset[i][0] for i in range(len(dm.val_dataloader().dataset))])
    log.info("calibration: %d validation windows of the run's data (%s)", ids.shape[0], dm.folder)
    return ids


def _write_lm_checkpoint(ckpt: dict, net: nn.Module, out: str | Path, meta: dict) -> None:
    """A checkpoint of ``ckpt``'s architecture holding ``net``'s function: every MoE block's (merged,
    compressed or quantised) experts are written back as plain expert weights, one per router slot; optimizer
    and loop states are dropped (the file is for inference and evaluation, not for resuming). Atomic."""
    from moe_core.blocks import RemappedExperts, get_expert_weights, set_expert_weights

    for ref in find_moe_blocks(net):
        gate, up, down = get_expert_weights(ref.experts)  # stored experts (E or merged G)
        if isinstance(ref.experts, RemappedExperts):
            im = ref.experts.index_map.cpu()
            gate, up, down = gate[im], up[im], down[im]  # (E, ...) one per router slot
        cfg = as_lm_config(ckpt["hyper_parameters"]["config"])
        bank = SwiGLUExperts(num_experts=gate.shape[0], dim=gate.shape[1], hidden_dim=gate.shape[2],
                             backend=cfg.expert_backend)
        set_expert_weights(bank, gate.float(), up.float(), down.float())
        ref.block.experts = bank
    keep = ("hyper_parameters", "datamodule_hyper_parameters", "lm_tokenizer", "lm_params",
            "pytorch-lightning_version", "moekit", "epoch", "global_step")
    new = {k: ckpt[k] for k in keep if k in ckpt}
    new["state_dict"] = {f"model.{k}": v for k, v in net.state_dict().items()}
    new["lm_surgery"] = [*ckpt.get("lm_surgery", []), meta]
    _save_atomic(new, out)


# a saved model may name these modules' nn.Module classes and dataclasses, and these activation functions;
# anything else (os.system, builtins.eval, another library's classes ...) is refused before unpickling
_MODULE_PREFIXES = ("torch.nn.", "moe_core.", "apps.lm.")
_ACTIVATIONS = frozenset({F.silu, F.gelu, F.relu, F.sigmoid, F.tanh})


def _allowed_global(name: str) -> object | None:
    """The object a pickle's ``module.qualname`` names if it is on the allow-list, else None (the module is
    imported only when it is one of the allowed packages, so nothing from the file chooses what runs)."""
    if not name.startswith(_MODULE_PREFIXES):
        return None
    module, _, qualname = name.rpartition(".")
    try:
        obj: object = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, type) and (issubclass(obj, nn.Module) or hasattr(obj, "__dataclass_fields__")):
        return obj
    return obj if any(obj is f for f in _ACTIVATIONS) else None


def load_saved_model(path: str | Path) -> nn.Module:
    """A whole ``nn.Module`` saved with ``torch.save(model)``, read with ``torch.load(weights_only=True)``.

    The pickle may name ``nn.Module`` subclasses and dataclasses of ``torch.nn``, ``moe_core`` and
    ``apps.lm``, and common activation functions; a file naming anything else is refused with a
    ``ValueError`` before any of it is unpickled, so a crafted file runs no code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file names globals outside the allow-list, or does not hold an ``nn.Module``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model file {p} not found")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(p)
    except Exception as e:  # noqa: BLE001 - not a torch.save zip archive: refused below by torch.load
        log.debug("cannot list the globals of %s: %s", p, e)
        names = []
    allowed, refused = [], []
    for name in names:
        obj = _allowed_global(name)
        if obj is None:
            refused.append(name)
        else:
            allowed.append(obj)
    if refused:
        raise ValueError(
            f"model file {p}: refused, it names {', '.join(sorted(refused))}, outside the allow-list "
            f"(nn.Module classes of {', '.join(m.rstrip('.') for m in _MODULE_PREFIXES)}); unpickling it "
            "could run code from the file, so nothing of it was loaded"
        )
    try:
        with torch.serialization.safe_globals(allowed):
            net = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"model file {p}: refused by torch.load(weights_only=True) ({str(e).strip().splitlines()[-1]}); "
            "nothing of it was loaded"
        ) from e
    if not isinstance(net, nn.Module):
        raise ValueError(f"model file {p} holds a {type(net).__name__}, not a torch.save(model) nn.Module")
    return net


def _load_tensor(path: str | Path) -> torch.Tensor:
    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"calibration file {path}: refused by torch.load(weights_only=True): {e}") from e
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"calibration file {path} holds a {type(ids).__name__}, not a (B, T) tensor")
    return ids


def _run(fn: Callable[..., object], argv: list[str] | None, *, prog: str) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    CLI(fn, args=_jsonargparse_spelling(args, fn), as_positional=False, prog=prog)


def _jsonargparse_spelling(argv: list[str], fn: Callable[..., object]) -> list[str]:
    """Rewrite the commands' historical spellings into jsonargparse's.

    ``--max-new-tokens 3`` becomes ``--max_new_tokens 3`` and a bare boolean flag ``--greedy`` becomes
    ``--greedy=true`` (jsonargparse wants a value). Only ``fn``'s own options are rewritten; every option's
    value is passed on verbatim (a prompt may start with ``--``).
    """
    params = inspect.signature(fn).parameters
    bools = {n for n, p in params.items() if p.annotation in (bool, "bool")}
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        name, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        key = name.replace("-", "_")
        if key not in params:
            out.append(tok)
            continue
        if key in bools and not eq:
            if i < len(argv) and argv[i].lower() in _BOOL_WORDS:
                out += [f"--{key}", argv[i]]
                i += 1
            else:
                out.append(f"--{key}=true")
            continue
        out.append(f"--{key}{eq}{value}")
        if not eq and i < len(argv):  # the option's value, verbatim
            out.append(argv[i])
            i += 1
    return out
