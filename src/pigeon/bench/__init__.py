"""`pigeon bench`: load generator and scenarios, run in their own processes."""
