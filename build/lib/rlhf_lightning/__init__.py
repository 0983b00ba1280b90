"""rlhf_lightning: SFT, reward modelling, PPO and DPO for causal language models on one Lightning Trainer."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Modules that moved in 0.2, by their old import paths. Configs and notebooks written for
# 0.1 name classes by these paths (``class_path: rlhf_lightning.ppo.PPOModule``); they keep
# working, with a warning that names the new path.
MOVED_MODULES = {
    "rlhf_lightning.base": "rlhf_lightning.systems.base",
    "rlhf_lightning.sft": "rlhf_lightning.systems.sft",
    "rlhf_lightning.reward": "rlhf_lightning.systems.reward",
    "rlhf_lightning.dpo": "rlhf_lightning.systems.dpo",
    "rlhf_lightning.ppo": "rlhf_lightning.systems.ppo",
    "rlhf_lightning.rollout": "rlhf_lightning.rl.rollout",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module it moved to (the very same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; update the import path", FutureWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
