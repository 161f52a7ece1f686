class GptzooError(Exception):
    """A problem with the user's input: the CLI prints its message as one line, with no traceback.

    Messages name the problem and the fix.
    """
