"""Use cases. Each service receives its ports (store, bus, clock) in its constructor."""
