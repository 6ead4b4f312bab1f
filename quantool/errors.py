"""The one exception type the CLI turns into a one-line message and exit code 2."""


class QuantoolError(Exception):
    """A problem with the user's input or environment, phrased as problem + fix."""
