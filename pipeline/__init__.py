"""The loop's top layer: it imports labeling, training, inference and review, and nothing imports it
(docs/architecture.md; the import contracts in pyproject.toml). chain.py declares the retrain chain, tasks.py holds
every Celery task, and the Runs and Models pages, the registry API and the train/demo commands live here."""
