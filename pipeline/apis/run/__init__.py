"""The run of `certify-api`: preparing it, its two modes (fixed n, sequential), the answers as votes, its state."""
