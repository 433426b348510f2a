"""The books of `certify-api`: every call journaled, budgeted and rate-granted by one ledger; the query log; billing."""
