"""normbench: how does each normalization layer behave as the batch shrinks?"""

from omegaconf import OmegaConf

from normbench import identity

__version__ = "0.1.0"

# conf/config.yaml names each run ${nb.run_name:...}: registered here, so every config composed in a
# process that imported normbench resolves it (the command, the tests, the scripts). Torch-free.
OmegaConf.register_new_resolver("nb.run_name", identity.run_name, replace=True)
