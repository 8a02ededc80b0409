"""Bad input is caught here, before any training: one rule per setting, each a one-line UserError.

`check_command_line` runs before Hydra starts a job (so before it creates any folder): it parses the
overrides once with Hydra's own parser, expands a sweep into its runs (a preset's sweep parameters
included), and for every run checks its keys, composes its config, and applies `check_config`, then
checks the output folders and the dataset. A sweep with one bad value stops before its first run.
`check_config` runs again in each job (cheap), so a run started some other way is checked too.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from normbench import budget, device, identity
from normbench.compose import CONF_DIR, CONFIG_NAME
from normbench.errors import UserError

# The config groups of the command line (model=, norm=, ...): conf/<group>/*.yaml is their registry.
GROUPS = tuple(sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_choice(group: str, name: str, valid: list[str] | None = None) -> None:
    valid = group_options(group) if valid is None else valid
    if name not in valid:
        raise UserError(f"unknown {group} {name!r}; valid {group} names: {', '.join(valid)}")


def _parse_int_setting(key: str, value) -> int:
    """A setting's value (a command-line string, a YAML number) as a whole number: 8 and 8.0 are 8."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r} is not a number; give a positive integer") from None
    if number != int(number):
        raise UserError(f"{key}={value!r} is not an integer; give a positive integer")
    return int(number)


def check_positive_int(key: str, value) -> int:
    number = _parse_int_setting(key, value)
    if number <= 0:
        raise UserError(f"{key}={value} must be a positive integer (at least 1)")
    return number


def check_nonnegative_int(key: str, value) -> int:
    number = _parse_int_setting(key, value)
    if number < 0:
        raise UserError(f"{key}={value} must be 0 or a positive integer")
    return number


def _as_yaml(value) -> str:
    """A choice as it is written on the command line: true, false, null, or the value."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_choice(key: str, value, choices: tuple) -> None:
    if value not in choices:
        shown = ", ".join(_as_yaml(c) for c in choices)
        raise UserError(f"{key}={value!r} is not one of: {shown}")


def check_lr(value) -> float:
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise UserError(f"lr={value!r} is not a number; give a positive learning rate such as lr=0.1") from None
    if not lr > 0:
        raise UserError(f"lr={value} must be positive; give a learning rate such as lr=0.1")
    return lr


def check_model(cfg) -> None:
    """Build the model once (cheap, on the CPU): every model and norm option error (a placement, a group
    count that does not divide a layer's channels, zero_init_residual with a norm that cannot) surfaces here;
    for a norm whose layer checks where it sits at a training forward (``NormInfo.checked_by_forward``: CBN,
    which needs a conv to produce its input) also one such forward of this throwaway copy."""
    import torch

    from normbench import norms
    from normbench.models import build_from_config

    model = build_from_config(cfg)
    if norms.NORMS[cfg.norm.name].checked_by_forward:
        norms.set_training_length(model, 1)
        try:
            model.train()(torch.zeros(cfg.norm.get("virtual_batch") or 1, 3, 32, 32))
        except norms.NormConfigError as e:
            raise UserError(f"cannot train {cfg.model.name} with norm={cfg.norm.name}: {e.args[0]}") from None


def check_writable(directory: str | os.PathLike, key: str = "out_dir") -> None:
    """The nearest existing ancestor of `directory` must be a writable folder; `key` is the setting to fix."""
    path = Path(directory).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path} cannot be written ({probe} is not a writable folder); "
                        f"set {key}=<a writable folder>")


def check_data_root(root: str | os.PathLike) -> None:
    """CIFAR-10 must be findable (and its image folders listable) under `root`. A failed torchvision
    download creates `root` on its way; what it created is removed, so a failed check leaves nothing."""
    from normbench import data

    root = Path(root).expanduser().absolute()
    missing = []  # the folders a download attempt may create, deepest first
    probe = root
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        kind, path = data.locate(root)
        if kind == "folder":
            data.folder_layout(path)  # class folders and readability, by listing names only (no decoding)
    except UserError:
        for folder in missing:
            try:
                folder.rmdir()  # only if still empty: a partial download is left for the user to see
            except OSError:
                break
        raise


def check_identity_ignores(cfg) -> None:
    """`identity_ignores` is conf/'s declaration of what no result depends on (identity.py reads it
    from there), not a setting of a run: an override of it would change nothing, so it is refused."""
    from omegaconf import OmegaConf

    for prefix, node, declared in (("", cfg, identity.declared_ignores()),
                                   ("data.", cfg.data, identity.declared_ignores("data", cfg.data.name))):
        given = node.get(identity.IGNORES_KEY)
        if (OmegaConf.to_container(given) if given is not None else None) != declared:
            raise UserError(f"{prefix}{identity.IGNORES_KEY} is declared in conf/ (the keys no result depends on), "
                            "not set per run; leave it as it is")


def check_eval_groups(cfg) -> None:
    """A batch-dependent norm's splits evaluated with mini-batch statistics (the training slice, the test set)
    hold at least one group of its normalization batch (the one evaluation groups by): a smaller one would be
    all remainder, no image evaluated, and its accuracy not a number."""
    group = identity.normalization_batch(cfg)
    if group is None:
        return
    for key, size in (("gap_train_images", cfg.gap_train_images), ("data.test_subset", cfg.data.get("test_subset"))):
        if size and size < group:
            off = " or 0 (off)" if key == "gap_train_images" else ""
            raise UserError(f"{key}={size} is smaller than norm {cfg.norm.name}'s normalization batch ({group}), so "
                            f"no group of it can be evaluated with mini-batch statistics; use {key} >= {group}{off}")


def check_config(cfg) -> None:
    """Check one run's composed config (what a YAML preset may have set too)."""
    from normbench import norms  # imports torch

    check_group_choice("model", cfg.model.name)
    check_group_choice("norm", cfg.norm.name)
    check_identity_ignores(cfg)
    batch_size = check_positive_int("batch_size", cfg.batch_size)
    check_positive_int("epochs", cfg.epochs)
    budget.check(cfg)
    check_lr(cfg.lr)
    norms.check_virtual_batch(cfg.norm.name, cfg.norm.get("virtual_batch"), batch_size)  # the norms' rule
    check_nonnegative_int("seed", cfg.seed)
    check_positive_int("log_every", cfg.log_every)
    check_choice("eval_stats", cfg.eval_stats, ("ema", "precise", "batch"))
    check_positive_int("precise_batches", cfg.precise_batches)
    check_nonnegative_int("gap_train_images", cfg.gap_train_images)
    # (with a steps or images budget the run's epochs are known once its data is: the trainer checks then)
    if check_nonnegative_int("freeze_stats_epochs", cfg.freeze_stats_epochs) > cfg.epochs and budget.unit(cfg) == "epochs":
        raise UserError(f"freeze_stats_epochs={cfg.freeze_stats_epochs} is more than epochs={cfg.epochs}; "
                        "use at most the run's epochs")
    for key in ("stat_gap_every", "ckpt_every"):
        check_nonnegative_int(key, cfg[key] or 0)
    check_positive_int("gap_every", cfg.gap_every)
    check_choice("select_best", cfg.select_best, (None, *identity.SELECTABLE_KEYS))
    if cfg.threads is not None:
        check_positive_int("threads", cfg.threads)
    check_positive_int("dist_timeout_s", cfg.dist_timeout_s)
    device.check_device(cfg.device)
    check_choice("amp", cfg.amp, device.SWITCH_CHOICES)
    check_choice("compile", cfg.compile, device.SWITCH_CHOICES)
    check_choice("memory_format", cfg.memory_format, device.MEMORY_FORMATS)
    check_choice("progress", cfg.progress, ("auto", True, False))
    check_positive_int("data.eval_batch_size", cfg.data.eval_batch_size)
    check_nonnegative_int("data.crop_padding", cfg.data.crop_padding)
    check_choice("sched.name", cfg.sched.name, tuple(group_options("sched")))  # a schedule is a conf/sched/ entry
    for key in ("subset", "test_subset", "val_split"):
        if cfg.data.get(key) is not None:
            check_positive_int(f"data.{key}", cfg.data[key])
    check_model(cfg)
    check_eval_groups(cfg)
    check_choice("optim.lr_scaling", cfg.optim.lr_scaling, tuple(identity.LR_SCALING))
    if cfg.on_bad_checkpoint not in ("restart", "stop"):
        raise UserError(f"on_bad_checkpoint={cfg.on_bad_checkpoint!r}; use restart or stop")
    check_writable(cfg.out_dir)


# --------------------------------------------------------------------------- the command line


def check_command_line(overrides: list[str], multirun: bool) -> None:
    """Check every run that `normbench [-m] OVERRIDES` would start, before Hydra starts any."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    from normbench.data import default_root

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composer = _Composer(GlobalHydra.instance())
            parser = OverridesParser.create(config_loader=composer.loader)
            parsed = _parse(parser, overrides)
            for override in parsed:  # every value of every sweep, before anything is composed
                _check_group_choices(override, composer.loader)
            hydra_lines = [o.input_line for o in parsed if o.is_hydra_override()]
            multirun, runs = _expand(parser, composer, parsed, multirun)

            data_roots = set()
            for run_lines in runs:
                run_overrides = _parse(parser, run_lines)
                for override in run_overrides:  # a preset's sweep parameters are new here
                    _check_group_choices(override, composer.loader)
                group_lines = [o.input_line for o in run_overrides if _is_group_choice(o)]
                _check_keys(run_overrides, *composer.known_keys(hydra_lines + group_lines))
                cfg = composer.compose(hydra_lines + run_lines, RunMode.RUN)
                try:
                    check_config(cfg)
                except OmegaConfBaseException as e:  # a key the run reads is gone (~norm) or cannot resolve
                    raise UserError(f"this config cannot run: {_one_line(e)}") from None
                if multirun:
                    check_writable(cfg.hydra.sweep.dir, "hydra.sweep.dir")
                    check_writable(_job_dir(cfg), "hydra.sweep.subdir")
                else:
                    check_writable(cfg.hydra.run.dir, "hydra.run.dir")
                data_roots.add(cfg.data.root or default_root())  # empty: the default, as in data.load_cifar10
    finally:
        GlobalHydra.instance().clear()
    for root in sorted(data_roots):
        check_data_root(root)


def _expand(parser, composer, parsed: list, multirun: bool) -> tuple[bool, list[list[str]]]:
    """Whether this is a multirun, and the task overrides of each of its runs.

    As Hydra does it: a preset may set hydra.mode=MULTIRUN, and its `hydra.sweeper.params` come first,
    then the command line's task overrides (a key in both takes the command line's value), then every
    combination of the sweeps (Hydra's basic sweeper's own function). The group choices decide the
    preset, so they alone are composed here: a mistyped key is reported later, with suggestions."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.errors import HydraException
    from hydra.types import RunMode

    task_lines = [o.input_line for o in parsed if not o.is_hydra_override()]
    choice_lines = [o.input_line for o in parsed if o.is_hydra_override() or _is_group_choice(o)]
    master = composer.compose(choice_lines, RunMode.MULTIRUN, validate_sweeps=False)
    if not (multirun or master.hydra.mode == RunMode.MULTIRUN):
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps:
            raise UserError(f"{sweeps[0]} gives several values: add -m (--multirun) to run one job per value, "
                            "or quote a value that contains a comma (key='a,b')")
        return False, [task_lines]
    params = [f"{key}={value}" for key, value in (master.hydra.sweeper.params or {}).items()]
    try:
        return True, BasicSweeper.split_arguments(_parse(parser, params + task_lines), None)[0]
    except HydraException as e:  # a sweep the basic sweeper cannot list, e.g. interval()
        raise UserError(_one_line(e)) from None


def _one_line(error: Exception) -> str:
    """Hydra's and OmegaConf's messages span lines (hints, the full key, the object type): keep the first two."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) or type(error).__name__


def _parse(parser, lines: list[str]) -> list:
    """Hydra's own override grammar: sweeps a,b, range(), choice(), glob(), quoting, +/++/~ prefixes."""
    from hydra.errors import OverrideParseException

    try:
        return parser.parse_overrides(list(lines))
    except OverrideParseException as e:
        reasons = [line.strip() for line in e.message.splitlines()
                   if line.strip() and not line.startswith(("See https", "Error parsing override")) and line.strip() != "^"]
        reason = reasons[0] if reasons else "syntax error"
        raise UserError(f"cannot parse {e.override!r}: {reason}; write key=value, or key=a,b for a sweep "
                        "(https://hydra.cc/docs/advanced/override_grammar/basic)") from None


class _Composer:
    """Composes configs the way Hydra's command line does, turning its errors into one-line UserErrors."""

    def __init__(self, global_hydra):
        self.hydra = global_hydra.hydra
        self.loader = global_hydra.config_loader()
        self._known_keys = {}  # group choices -> the dotted keys of that config

    def compose(self, lines: list[str], run_mode, validate_sweeps: bool = True):
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            return self.hydra.compose_config(CONFIG_NAME, list(lines), run_mode=run_mode, with_log_configuration=False,
                                             validate_sweep_overrides=validate_sweeps)
        except (HydraException, OmegaConfBaseException) as e:
            raise UserError(_one_line(e)) from None

    def known_keys(self, group_lines: list[str]) -> tuple[set[str], dict]:
        """The dotted keys (data.subset, norm.groups, ...) of the config these group choices compose,
        and the choices themselves (norm: bn, ...). The choices decide the keys: bn has no norm.groups."""
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        cache_key = tuple(group_lines)
        if cache_key not in self._known_keys:
            cfg = self.compose(group_lines, RunMode.RUN)
            choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
            tree = OmegaConf.to_container(cfg, resolve=False)
            del tree["hydra"]
            self._known_keys[cache_key] = (set(_dotted_keys(tree)), choices)
        return self._known_keys[cache_key]


def _dotted_keys(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")


def _is_group_choice(override) -> bool:
    """model=cnn, hydra/launcher=slurm, norm@x=bn: a choice of a config group, not a value."""
    return override.key_or_group in GROUPS or "/" in override.key_or_group or override.package is not None


def _values(override) -> list:
    """Every value an override gives its key (one, or each value of a sweep), unquoted."""
    if override.is_sweep_override():
        return list(override.sweep_iterator())
    return [override.value()]


def _check_group_choices(override, loader) -> None:
    if override.is_delete() or not _is_group_choice(override):
        return
    group = override.key_or_group
    # Hydra's own groups (hydra/launcher) also list its plugins' options, so ask Hydra for those.
    valid = loader.get_group_options(group) if group.startswith("hydra/") else group_options(group)
    for value in _values(override):
        if value is None:  # Hydra has no null choice (it raises a ValueError)
            raise UserError(f"{override.input_line}: choose one of {', '.join(valid)}, or drop a default with ~{group}")
        check_group_choice(group, str(value), valid)


def _check_keys(overrides: list, known_keys: set[str], choices: dict) -> None:
    """Each value override must name a key of the composed config: Hydra would add an unknown
    `+key` silently (and a run would ignore it), so `+` is refused for the app's keys. Hydra's
    own keys (hydra.*) are left to Hydra, where `+` is legitimate (e.g. +hydra.job.env_set.X=1)."""
    for override in overrides:
        if override.is_hydra_override() or _is_group_choice(override):
            continue
        key = override.key_or_group
        if key not in known_keys:
            raise UserError(_unknown_key_message(key, known_keys, choices))
        if override.is_add():
            raise UserError(f"'{key}' is already in the config: set it without the '+' ({override.input_line[1:]})")
        if override.is_delete():
            raise UserError(f"cannot remove '{key}': every run reads it; set it instead (e.g. {key}=null)")


def _unknown_key_message(key: str, known_keys: set[str], choices: dict) -> str:
    """unknown key 'epoch'; did you mean 'epochs'? For a group's option (norm.groups with norm=bn)
    also: which options the chosen entry has, and which entries have that option."""
    close = difflib.get_close_matches(key, sorted(known_keys), n=3, cutoff=0.75)
    message = f"unknown key '{key}'"
    if close:
        message += "; did you mean " + " or ".join(f"'{k}'" for k in close) + "?"
    group, _, option = key.partition(".")
    if group in GROUPS and option and choices.get(group):
        chosen = choices[group]
        own = sorted(k.split(".", 1)[1] for k in known_keys if k.startswith(f"{group}.") and k.count(".") == 1)
        message += f" ({group} {chosen} has: {', '.join(k for k in own if k != 'name') or 'no options'}"
        owners = [name for name in group_options(group) if option.split(".")[0] in _yaml_keys(group, name)]
        if owners:
            message += f"; {group} {', '.join(owners)} {'has' if len(owners) == 1 else 'have'} '{option}'"
        message += ")"
    elif not close:
        message += "; `normbench --cfg job` lists the keys"
    return message


def _yaml_keys(group: str, name: str) -> set[str]:
    from omegaconf import OmegaConf

    return set(OmegaConf.load(CONF_DIR / group / f"{name}.yaml").keys())


def _job_dir(cfg) -> str:
    """A sweep job's folder (sweep.dir/sweep.subdir), or the sweep folder where the subdir names
    something only the launcher knows (Hydra's default ${hydra.job.num})."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return str(Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir))
    except OmegaConfBaseException:
        return str(cfg.hydra.sweep.dir)
