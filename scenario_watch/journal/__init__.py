"""The SQLite journal: rows, checked transitions, schema versions, retention."""
