"""User-facing errors: the CLI prints str(err) as one line and exits 2, no traceback."""
from deepvis.errors import DeepvisError


class UserError(DeepvisError):
    """Bad input from the user (model spec, layer name, weights, config). The message names the
    culprit and the fix."""
