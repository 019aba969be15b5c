"""JSON Schemas (draft 2020-12), one per contract; shipped as package data."""
