"""Differential privacy: client-level DP-FedAvg (central, distributed, local noise; fixed or adaptive
clipping), record-level DP-SGD through Opacus, and the RDP accountant that reports the spent (epsilon,
delta). See docs/privacy.md."""
