"""One query of `certify-api`: its work units, the noisy image sent, retries, rate limit, errors and scrubbed secrets."""
