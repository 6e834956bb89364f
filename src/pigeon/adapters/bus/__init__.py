"""Bus adapters: in-process (embedded default); Redis pub/sub for many nodes."""
