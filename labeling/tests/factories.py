"""factory_boy factories for the labeling models. Projects are made by the project_create service (so they get
their preset's heads); images are small generated photos written through the app's storage, as the importer
writes them (content-addressed file and thumbnail).

    project = ProjectFactory(preset="car", slug="cars", min_image_side=32)
    toyota = LabelClassFactory(head=project.heads.get(name="make"), name="Toyota")
    image = ImageFactory(project=project, color="red", labels={"make": toyota})
"""

import hashlib
import io

import factory
from factory.django import DjangoModelFactory
from PIL import Image as PILImage

from conftest import make_photo
from labeling import storage
from labeling.models import Head, Image, Label, LabelClass, Project
from labeling.normalize import normalize_key
from labeling.services import project_create


class ProjectFactory(DjangoModelFactory):
    """A project with its preset's heads (labeling.services.project_create); other fields are saved after."""

    class Meta:
        model = Project

    name = factory.Sequence(lambda n: f"Project {n}")
    slug = None  # project_create: the slugified name
    preset = "retrieval"

    @classmethod
    def _create(cls, model_class, *, name, preset, slug=None, description="", **fields):
        project = project_create(name=name, preset=preset, slug=slug, description=description)
        if fields:
            for key, value in fields.items():
                setattr(project, key, value)
            project.save(update_fields=list(fields))
        return project


class HeadFactory(DjangoModelFactory):
    """An extra head on a project (a preset's heads come with ProjectFactory)."""

    class Meta:
        model = Head

    project = factory.SubFactory(ProjectFactory)
    name = factory.Sequence(lambda n: f"head{n}")
    order = factory.LazyAttribute(lambda o: o.project.heads.count())


class LabelClassFactory(DjangoModelFactory):
    class Meta:
        model = LabelClass

    head = factory.SubFactory(HeadFactory)
    name = factory.Sequence(lambda n: f"class {n}")
    normalized_name = factory.LazyAttribute(lambda o: normalize_key(o.name))
    parent = None


class ImageFactory(DjangoModelFactory):
    """A generated photo (conftest.make_photo: a coloured shape on a noisy background) stored as the importer
    stores one. `labels={head name: LabelClass or None}` gives the image a label row for every head of its
    project, as an import does (heads not named stay unlabeled); without it the image has no label rows."""

    class Meta:
        model = Image
        skip_postgeneration_save = True  # `labels` writes Label rows, nothing on the image

    class Params:
        color = "red"
        shape = "square"
        size = 64
        seed = factory.Sequence(lambda n: n)
        fmt = "JPEG"

    project = factory.SubFactory(ProjectFactory)
    data = factory.LazyAttribute(lambda o: make_photo(o.color, o.shape, size=o.size, seed=o.seed, fmt=o.fmt))
    sha256 = factory.LazyAttribute(lambda o: hashlib.sha256(o.data).hexdigest())
    file = factory.LazyAttribute(
        lambda o: storage.image_name(o.project.slug, o.sha256, ".jpg" if o.fmt == "JPEG" else f".{o.fmt.lower()}")
    )
    thumbnail = factory.LazyAttribute(lambda o: storage.thumb_name(o.project.slug, o.sha256))
    original_name = factory.Sequence(lambda n: f"IMG_{n:04d}.jpg")
    width = factory.LazyAttribute(lambda o: PILImage.open(io.BytesIO(o.data)).size[0])
    height = factory.LazyAttribute(lambda o: PILImage.open(io.BytesIO(o.data)).size[1])
    byte_size = factory.LazyAttribute(lambda o: len(o.data))
    group_key = factory.LazyAttribute(lambda o: o.original_name.rsplit(".", 1)[0])

    @classmethod
    def _build(cls, model_class, *args, data=None, **kwargs):
        return super()._build(model_class, *args, **kwargs)

    @classmethod
    def _create(cls, model_class, *args, data=None, **kwargs):
        storage.store_bytes(kwargs["file"], data)
        thumb = storage.make_thumbnail(data)
        if kwargs.get("thumbnail") and thumb:
            storage.store_bytes(kwargs["thumbnail"], thumb)
        return super()._create(model_class, *args, **kwargs)

    @factory.post_generation
    def labels(self, create, extracted, **kwargs):
        if not create or extracted is None:
            return
        Label.objects.bulk_create(
            [Label(image=self, head=head, label_class=extracted.get(head.name)) for head in self.project.heads.all()]
        )


class LabelFactory(DjangoModelFactory):
    class Meta:
        model = Label

    image = factory.SubFactory(ImageFactory)
    head = factory.LazyAttribute(lambda o: o.image.project.heads.order_by("order").first())
    label_class = None
