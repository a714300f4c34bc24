"""Stock prediction app: Alpha158/Alpha360 features, MIGA and baselines, IC metrics and a TopK-Dropout backtest."""
