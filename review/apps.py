from django.apps import AppConfig


class ReviewConfig(AppConfig):
    name = "review"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        """Plug review's parts into labeling, which sits below it and never imports it: the image grid's filters
        and sorts, and the undo of a review queue bulk rule from the Health page's action list; and into inference,
        which sits below it too: a shelf photo kept for review becomes an item of the shelf box queue."""
        from inference import shelf
        from labeling import health
        from labeling import selectors as labeling_selectors
        from labeling.models import DatasetAction

        from . import box_queue, selectors, services

        labeling_selectors.grid_hooks = selectors
        health.UNDO_HOOKS[DatasetAction.Kind.REVIEW_BULK] = services.reopen_bulk_rule_items
        shelf.box_review_hook = box_queue.box_item_add
