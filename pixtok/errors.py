"""The one exception type for a user's mistake: the CLI prints its message on one line."""


class UserError(Exception):
    """Bad input from the user (a path, a recipe, an override, a request): no traceback."""
