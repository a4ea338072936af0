"""The errors that mean "bad input": library code raises them naming its parameter and what
works; the command line prints them as `error: ...` (translating parameters to flags) and
exits with 2, without a traceback."""


class InputError(ValueError):
    """A bad input; the message names the problem and the fix."""


class SettingError(InputError):
    """A setting (`parameter`) has a value that cannot work."""

    def __init__(self, parameter: str, problem: str):
        super().__init__(f"{parameter}: {problem}")
        self.parameter, self.problem = parameter, problem
