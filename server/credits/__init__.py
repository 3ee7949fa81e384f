"""Credits: reserve → confirm | cancel, grants, the ledger, the sweeper."""
