"""Argument checks shared by moe_core (no paper; our design).

Closed choices are typed as ``Literal[...]`` and resolved in one place that raises on unknown values:
:func:`check_choice`. Every moe_core module uses it, so an unknown value always reads
``"<name> must be one of (...), got <value>"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def check_choice(name: str, value: T, options: Iterable[T]) -> T:
    """Return ``value`` if it is one of ``options``, else raise ``ValueError`` naming the argument.

    Args:
        name: the argument's name, as the caller spells it (quoted in the error).
        value: the value passed.
        options: the allowed values (e.g. the members of the argument's ``Literal`` type, or the keys of a
            table of implementations).

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: ``value`` is not in ``options``.
    """
    allowed = tuple(options)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_router_output(routing: object, where: str) -> None:
    """Raise ``TypeError`` unless ``routing`` is one :class:`~moe_core.types.RouterOutput`.

    A Chain-of-Experts or dense layer's ``MoEOutput.routing`` is a list (one entry per round, or none): the
    message says so and how to pass its entries, instead of ``'list' object has no attribute 'num_experts'``.

    Args:
        routing: what the caller passed as ``routing``.
        where: the function's name, quoted in the error.
    """
    from moe_core.types import RouterOutput

    if isinstance(routing, RouterOutput):
        return
    if isinstance(routing, (list, tuple)):
        raise TypeError(
            f"{where}: routing is a list of {len(routing)} RouterOutput(s) (MoEOutput.routing of a "
            "Chain-of-Experts or dense layer); pass one RouterOutput, e.g. for r in out.routings(): "
            f"{where}(r)"
        )
    raise TypeError(f"{where}: routing must be a RouterOutput, got {type(routing).__name__}")


def check_rows(x: torch.Tensor, dim: int, *, name: str = "x", rows: str = "N", prefix: str = "") -> None:
    """``ValueError`` unless ``x`` is ``(rows, dim)`` and finite (no NaN, no +/-inf); messages
    ``"<prefix><name> must have shape (<rows>, dim=<dim>), got <shape>"`` and ``"<prefix><name> contains
    non-finite values (NaN or +/-inf)"``. One reduction (a host sync) in the common, finite case."""
    import torch

    if x.dim() != 2 or x.shape[-1] != dim:
        raise ValueError(f"{prefix}{name} must have shape ({rows}, dim={dim}), got {tuple(x.shape)}")
    # a NaN or inf anywhere makes the sum non-finite, so a finite sum settles it in one reduction (the
    # element-wise test is five passes over x); a non-finite sum of finite values (overflow) falls through
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise ValueError(f"{prefix}{name} contains non-finite values (NaN or +/-inf)")
