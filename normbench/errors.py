"""The one exception type for bad user input: the CLI prints it as a single line and exits 2."""


class UserError(Exception):
    """Something the user can fix (a config value, a path, a name). Never a bug."""

    exit_code = 2
