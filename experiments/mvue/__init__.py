"""MVUE N:M gradient pruning on the byte-level LM: dense vs 1:2, 2:4 and greedy."""
