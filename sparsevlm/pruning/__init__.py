"""Visual-token pruning inside packed prefill: plans (schedule), raters, scores, selection,
recycling and the shrinking packed stream (pack). See the README's "Sparsification"."""
