"""The base of every error meant for a person: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input or a missing resource, described in one line: what is wrong and what to do."""


class RunFailed(Exception):
    """A run that failed for a reason other than its input, described in one line; the CLI exits 1."""
