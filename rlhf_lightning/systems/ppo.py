"""PPO against a frozen reward model (Ziegler et al. 2019; Ouyang et al. 2022), with every known detail.

The online-RL system with its defaults: a critic (a separate model started from the
reward model, or a value head on the policy), GAE over per-token KL-penalised rewards,
advantage whitening, the adaptive KL controller, one sample per prompt. See
``systems/online_rl.py`` for the iteration and ``configs/ppo.yaml`` for the settings.
"""

from __future__ import annotations

from rlhf_lightning.systems.online_rl import OnlineRLModule


class PPOModule(OnlineRLModule):
    """PPO for a causal-LM policy; frozen reference and reward model, separate or shared critic.

    The same system as :class:`OnlineRLModule` (whose defaults are PPO's), under the class
    path PPO configs and checkpoints name.
    """
