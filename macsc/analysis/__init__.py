"""Reading finished runs: the report beside the paper's tables, the overlap of correct predictions,
the learned modality weights, and the visual-reasoning probes."""
