"""SQuAD scoring and data: features and post-processing, the official metric, file reading and
checks, and the precision-recall plots."""
