"""Ray actors: thin wrappers that hold models or API clients and call into `pipeline`."""
