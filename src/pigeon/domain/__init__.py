"""The pure core: models, identifiers, errors and limits.

Imports nothing from adapters or gateways."""
