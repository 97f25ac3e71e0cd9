"""Time-series forecasting: series, autoregressive MLP and latent RNN/GRU/LSTM forecasters,
baselines, training, k-step evaluation, the textbook plot, the `train --task forecast` CLI
and the sine models of the zoo. See docs/forecasting.md.
"""
