"""The one exception AutoSP raises when it refuses a model, an input or a configuration."""


class AutoSPError(ValueError):
    """AutoSP cannot make this model sequence-parallel exactly; the message says why and where.

    Raised at compile time (before anything runs) for ops that mix values along the sequence
    without a rule, head counts that cannot be split over the group, bad configuration, and
    graph breaks under ``fullgraph``. A ``ValueError``, as DeepSpeed's AutoSP raises for a model
    it cannot handle, so callers' ``except ValueError`` keeps working.
    """


class OutputNeedsOtherRanks(AutoSPError):
    """A graph output that is not the loss (nothing in the step reads it) needs positions other
    ranks hold: HF's sliding-window KV cache keeps the sequence's last positions in every forward
    of a model with ``use_cache=True``. ``autosp.compile`` then builds no cache
    (``use_cache=False``) where the caller did not ask for one."""
