"""moe_core: mixture-of-experts building blocks in pure PyTorch.

Routers (``routers``) turn tokens into a :class:`~moe_core.types.RouterOutput`; expert banks (``experts``)
dispatch and combine; ``layer`` composes them into MoE layers; auxiliary losses are pure functions of the
routing (``losses``); ``multigate`` holds the dense multi-gate mixtures (MMoE, CGC/PLE, HoME); ``blocks``,
``surgery`` and ``inference`` are tools for trained MoE models (moekit or HF transformers blocks);
``parallel`` scales MoE layers out. Nothing here imports lightning, mlflow, optuna, the apps or the
pipelines, and nothing here is a command-line program.

Docstrings name each method's paper (arXiv id) and tag where a claim comes from: [P] paper text, [C] public
code, [S] secondary source, [U] unverified value, [R] reconstructed reading, [D] our decision, [M] measured
here. The legend, the papers and the tables that several modules share are in ``docs/moe_core.md``.
"""
