"""normbench: how does each normalization layer behave as the batch shrinks?"""

from omegaconf import OmegaConf

from normbench import identity

__version__ = "0.1.0"

# conf/config.yaml names each run ${nb.run_name:...}: registered here, so every config composed in a
# process that imported normbench resolves it (the command, the tests, the scripts). Torch-free.
OmegaConf.register_new_resolver("nb.run_name", identity.run_name, replace=True)


def _per_norm(norm_name: str, values, default):
    """``${nb.per_norm:${norm.name},{in: 0.8},0.1}``: a value that a preset sets for some norms (its
    ``values``), ``default`` for the others; resolved before a run's identity is taken, so a norm at
    ``default`` is the same run as without the resolver."""
    return values.get(norm_name, default)


OmegaConf.register_new_resolver("nb.per_norm", _per_norm, replace=True)
