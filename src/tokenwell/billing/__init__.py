"""Keys, prices, the spend ledger, budgets and rate limits."""
