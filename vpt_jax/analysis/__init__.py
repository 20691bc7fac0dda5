"""Reading finished runs: the paper's Table-1 report and pictures of a tuned run."""
