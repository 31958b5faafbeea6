"""AutoSP: Ulysses sequence parallelism inserted by torch.compile passes, exact against one device."""
from autosp.errors import AutoSPError

__all__ = ["AutoSPError"]
