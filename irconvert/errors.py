"""The one exception type for problems a user can fix."""


class IRConvertError(Exception):
    """A bad input (recipe, model name, file, folder): the message says what, where and how to fix it.

    The CLI prints it as one line on stderr and exits with code 2; anything else is a bug.
    """
