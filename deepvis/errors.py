"""The one exception type of deepvis: every error meant for a user (bad input, a missing or damaged
atlas, an unreachable store) is a DeepvisError whose message is one complete line naming the
culprit and the fix (what the CLI prints after `deepvis CMD: error:`). Kept free of imports so that
tasks/ and storage/ can subclass it without pulling anything in."""


class DeepvisError(Exception):
    """A user-facing error: str(err) is a one-line explanation with the fix."""
