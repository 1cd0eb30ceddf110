"""The data module's user errors: one line naming the key, pattern, folder or file to fix.

Each is a :class:`leffa.errors.UserError` (the CLI prints it as one line) and also the built-in
exception the same mistake raised before (``FileNotFoundError``, ``ValueError``), so callers that
catch those keep working.
"""

from leffa.errors import UserError


class ShardsNotFound(UserError, FileNotFoundError):
    """A shard specification names files that do not exist, or a pattern that matches nothing."""


class BadDataConfig(UserError, ValueError):
    """A ``data.*`` value, a manifest or the samples it points to cannot be used as configured."""
