"""The ``moekit`` command line: ``moekit <app> {fit,validate,test,predict} --config ...``.

Each app's YAML config names its LightningModule and LightningDataModule by ``class_path``; LightningCLI
is the registry.
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

APPS = ("recsys", "finance", "lm")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``moekit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: moekit {" + ",".join(APPS) + "} {fit,validate,test,predict} --config CONFIG.yaml")
        return
    app, rest = argv[0], argv[1:]
    if app not in APPS:
        raise SystemExit(f"moekit: unknown app {app!r}; choose one of {', '.join(APPS)}")
    LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=rest,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
