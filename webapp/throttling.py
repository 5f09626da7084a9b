"""Per-token API throttling: each API token (each client app) has its own budget, so one noisy client cannot
use up the rate of another token of the same user; session users are throttled per user, anonymous per IP."""

from rest_framework.throttling import SimpleRateThrottle


class TokenRateThrottle(SimpleRateThrottle):
    scope = "token"

    def get_cache_key(self, request, view):
        auth = getattr(request, "auth", None)
        key = getattr(auth, "key", None)
        if key:
            ident = f"token:{key}"
        elif request.user and request.user.is_authenticated:
            ident = f"user:{request.user.pk}"
        else:
            ident = f"ip:{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}


class PublicIPRateThrottle(SimpleRateThrottle):
    """Anonymous requests to an endpoint an operator made public (LOUPE_CAR_ENDPOINT_PUBLIC): a budget per client
    IP (REST_FRAMEWORK NUM_PROXIES says which X-Forwarded-For entry is the client), LOUPE_CAR_PUBLIC_RATE.
    Authenticated requests are left to the token throttle."""

    scope = "car_public"

    def get_rate(self):
        from django.conf import settings

        return settings.LOUPE_CAR_PUBLIC_RATE

    def get_cache_key(self, request, view):
        if request.user and request.user.is_authenticated:
            return None
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}
