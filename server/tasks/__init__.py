"""Tasks: one run of a feature's pipeline for a user, paid for with credits."""
