"""Rate-limit counters: in-process, or shared by the nodes of a cluster through Redis."""
