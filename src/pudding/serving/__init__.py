"""Stage 4, serving: the continuous-batching engine, the HTTP server and the gateway."""
