"""Multi-task recommendation app: Shared-Bottom, MMoE, PLE and HoME on a declarative feature schema.

``data.py`` (Census-Income loader, pinned split, generic CSV/Parquet DataModule), ``schema.py`` (feature
schema and the saved, versioned preprocessor), ``model.py`` (networks returning logits and gate information),
``task.py`` (LightningModule), ``configs/*.yaml`` (``moekit recsys fit --config ...``).
"""
