"""The candidate pool artifact and the multi-set evaluator that the pruning and routing stages share."""
