"""The user's mistakes and faults, as opposed to ours.

A `UserError` is something the user can fix (a config key, a path, a damaged
checkpoint or shard). `lcl` prints it as one line and exits with code 2, with
no traceback; anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A fault in what the user gave us: one line on stderr, exit code 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A user error in the configuration or the layout it asks for: one line naming the key."""
