"""The library behind every protocol: trainable rule, optimizer, steps, cache, pruning, runs."""
