"""Errors the engine raises. Each message is meant to be shown to a ComfyUI user as is."""


class SPMError(ValueError):
    """Base class: something about a membrane, its file or its use is wrong."""


class SPMFileError(SPMError):
    """A membrane file cannot be read: the message names the file and what is wrong with it."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class SPMModelMismatch(SPMError):
    """A membrane does not fit the model it is applied to (architecture or shapes)."""
