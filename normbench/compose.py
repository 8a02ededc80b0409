"""The real config, composed from conf/ the way the normbench command composes a job's: one helper
for the tests, the scripts and the bench (the command line itself composes through Hydra, and its
check through ``validate``).

    cfg = compose(["model=cnn", "norm=gn"])              # with its hydra node, as a job's config
    cfg = compose(["experiment=quick"], hydra_node=False)  # what a task function sees
    jobs = expand(["norm=glob(*)", "lr=0.1,0.2"])           # the runs of a sweep, one override list each

Torch-free at import; Hydra is imported when a config is composed.
"""

from __future__ import annotations

import os
from typing import Iterable

from omegaconf import DictConfig, OmegaConf, open_dict

from normbench.identity import CONF_DIR

CONFIG_NAME = "config"


def compose(overrides: Iterable[str] = (), *, hydra_node: bool = True) -> DictConfig:
    """conf/config.yaml with `overrides`, as one run of ``normbench OVERRIDES`` sees it: Hydra's own
    node included (``hydra.sweeper.params``, ``hydra.launcher``, ...), the run's folder as its output
    folder, and HydraConfig set to it, as Hydra sets it for a job. With ``hydra_node=False`` the hydra
    node is left out of the returned config (HydraConfig still holds it), as a task function gets it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):  # as Hydra's run_job: the job's folder, absolute
        cfg.hydra.runtime.output_dir = os.path.abspath(str(cfg.hydra.run.dir))
    HydraConfig().set_config(cfg)
    if not hydra_node:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def expand(overrides: Iterable[str]) -> list[list[str]]:
    """The jobs a sweep's overrides expand to, exactly as Hydra's basic sweeper lists them: the product
    of the swept values, a glob() of a config group over that group's entries in conf/."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def config_default(key: str):
    """A value as conf/config.yaml sets it (before any preset or override), e.g. target_acc."""
    return OmegaConf.load(CONF_DIR / f"{CONFIG_NAME}.yaml")[key]
