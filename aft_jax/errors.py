"""`UserError`: a mistake in what the user gave (a config, a data file, a checkpoint, a task's files). The
command line prints its message as one line and exits with status 2; every such error's message names
the file (and line) or the config key, the value and what was expected."""


class UserError(Exception):
    """Base of every error the user can fix; each subclass is also a ValueError where it was one."""


class SettingError(UserError, ValueError):
    """A setting (a run-config key, a command-line argument) that does not fit the data, the devices, the
    task or another setting, found below the config layer; the message names the key and its value."""
