"""Configuration: the frozen Settings, the flags and environment that fill them, presets, and
the limits and machine facts (CPUs) their defaults come from. Any layer may read it."""
