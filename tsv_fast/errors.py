"""Error and warning types: bad input fails loudly, naming the task, key and problem."""


class TSVInputError(ValueError):
    """Inputs that cannot be merged or compressed (missing keys, shape mismatch, NaN/Inf...)."""


class TSVRankWarning(UserWarning):
    """A matrix key is too small for the number of tasks (r < T gives rank k = 0)."""
