"""Store adapters: SQLite (embedded default); PostgreSQL and DynamoDB follow the same contract."""
