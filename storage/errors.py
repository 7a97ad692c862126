"""Storage errors: the message is a complete one-line explanation with the fix."""
from deepvis.errors import DeepvisError


class StoreError(DeepvisError):
    """A store or dataset problem the user can fix (bad URI, missing bucket, unreadable path)."""
