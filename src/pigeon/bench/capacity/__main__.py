"""The moto server's process (`moto.moto_server` spawns `python -m pigeon.bench.capacity
<port>`): a module of its own so that the package can be run without importing a module twice."""

import sys

from pigeon.bench.capacity.moto import serve_moto

serve_moto(int(sys.argv[1]))  # pragma: no cover - runs in the moto process
