"""User-facing errors: the CLI prints str(err) as one line and exits 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (model spec, layer name, weights, config). The message names the
    culprit and the fix."""
