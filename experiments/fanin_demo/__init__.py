"""Demo: a fixed fan-in classifier trained on generated data."""
