"""Stage 3, routing: labels for every pool set, the router and its training, and the routed model."""
