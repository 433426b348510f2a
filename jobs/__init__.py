"""Ray job entry points and the `dsmooth` command line."""
