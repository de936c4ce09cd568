"""Alignment objectives: preference data, pairwise reward-model losses, DPO/IPO with the frozen base as reference."""
