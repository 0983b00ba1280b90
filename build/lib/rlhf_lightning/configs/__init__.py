"""The stage configs, shipped inside the package as ``rlhf_lightning.configs`` (see pyproject.toml)."""
