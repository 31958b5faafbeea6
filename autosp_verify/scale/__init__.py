"""The scale simulator: per-rank peak memory of one training step at real model sizes, without
the hardware (see docs/scale.md)."""
