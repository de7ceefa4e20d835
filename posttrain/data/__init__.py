"""Records -> validated examples -> token batches."""
