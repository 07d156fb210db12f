"""Commands around training: the memory planner, metrics plots, the built-in tiny model."""
