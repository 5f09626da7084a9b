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

        from django.contrib.auth import get_user_model  # noqa: PLC0415
        from rest_framework.authtoken.models import Token  # noqa: PLC0415

        from webapp.authentication import forget_tokens  # noqa: PLC0415

        user_model = get_user_model()
        post_delete.connect(forget_tokens, sender=Token, dispatch_uid="loupe-token-cache-del", weak=False)
        post_save.connect(forget_tokens, sender=user_model, dispatch_uid="loupe-token-cache-user", weak=False)
        post_delete.connect(forget_tokens, sender=user_model, dispatch_uid="loupe-token-cache-user-del", weak=False)

        for model in (Project, Head):
            post_save.connect(changed, sender=model, dispatch_uid=f"loupe-serving-{model.__name__}", weak=False)
            post_delete.connect(changed, sender=model, dispatch_uid=f"loupe-serving-del-{model.__name__}", weak=False)
