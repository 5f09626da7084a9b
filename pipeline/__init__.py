"""The loop's top layer: it imports labeling, training, inference and review, and nothing imports it
(docs/architecture.md; the import contracts in pyproject.toml). Issue 16 moves the retrain chain here step by step;
so far it holds the demo command."""
