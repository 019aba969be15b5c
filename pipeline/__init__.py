"""The engine and product surface around the stages: CLI, manifest, graph, envelopes, errors, paths."""
