"""factory_boy factories for the review models.

ReviewItemFactory(image=image, head=head, queue="uncertain", suggested_class=red, status="done", ...)
"""

import factory
from factory.django import DjangoModelFactory

from labeling.tests.factories import ImageFactory
from review.models import ReviewItem


class ReviewItemFactory(DjangoModelFactory):
    """An open item of the mislabel queue on the first head of its image's project."""

    class Meta:
        model = ReviewItem

    image = factory.SubFactory(ImageFactory)
    project = factory.SelfAttribute("image.project")
    head = factory.LazyAttribute(lambda o: o.project.heads.order_by("order").first())
    queue = ReviewItem.Queue.MISLABEL
    score = 0.5
    rank = factory.Sequence(lambda n: n)
