"""The command line's own errors; `cli.main` turns each into its exit code (README "Exit codes")."""


class UsageError(Exception):
    """Bad input from the command line that argparse cannot see (exit 2)."""


class InputError(Exception):
    """A file named on the command line is not what it should be, such as a bad export (exit 1)."""
