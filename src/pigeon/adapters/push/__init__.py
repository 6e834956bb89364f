"""Push senders: one adapter per platform gateway behind `ports.PushSender`."""
