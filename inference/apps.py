from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.db.models.signals import post_delete, post_save  # noqa: PLC0415

        from labeling.models import Head, Project  # noqa: PLC0415

        from . import services  # noqa: PLC0415

        def changed(sender, instance, **kwargs):
            # drop every cached entry: a renamed slug or a head's project would cost a lookup, and refilling
            # the cache is one query per project. Other processes see the change within LOUPE_ACTIVE_MODEL_TTL.
            services.forget_project(None)

        for model in (Project, Head):
            post_save.connect(changed, sender=model, dispatch_uid=f"loupe-serving-{model.__name__}", weak=False)
            post_delete.connect(changed, sender=model, dispatch_uid=f"loupe-serving-del-{model.__name__}", weak=False)
