"""Adapters: one implementation of a port per engine. Only `pigeon.app` knows them all."""
