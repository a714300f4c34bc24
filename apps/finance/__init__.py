"""Stock prediction app: Alpha158/Alpha360 features, MIGA + baselines, IC metrics, TopK-Dropout backtest."""
