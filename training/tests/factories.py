"""factory_boy factories for the training models: rows only, nothing is trained (conftest's `trained_version`
fixture trains a real model). A ModelVersion gets the project's next number.

    run = TrainingRunFactory(project=project, status=TrainingRun.Status.SUCCEEDED, pretrained_source="bundled")
    ModelVersionFactory(project=project, run=run, artifact_dir=v1.artifact_dir, metrics={...})
"""

import factory
from django.db.models import Max
from factory.django import DjangoModelFactory

from labeling.tests.factories import ProjectFactory
from training.models import ModelVersion, TrainingRun


class TrainingRunFactory(DjangoModelFactory):
    class Meta:
        model = TrainingRun

    project = factory.SubFactory(ProjectFactory)


class ModelVersionFactory(DjangoModelFactory):
    class Meta:
        model = ModelVersion

    project = factory.SubFactory(ProjectFactory)
    number = factory.LazyAttribute(
        lambda o: (ModelVersion.objects.filter(project=o.project).aggregate(n=Max("number"))["n"] or 0) + 1
    )
    artifact_dir = ""
