"""Storage errors: the message is a complete one-line explanation with the fix."""


class StoreError(Exception):
    """A store or dataset problem the user can fix (bad URI, missing bucket, unreadable path)."""
