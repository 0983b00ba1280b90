"""rlhf_lightning: SFT, reward modelling, PPO and DPO for causal language models on one Lightning Trainer."""

__version__ = "0.1.0"
