from django.core.validators import ProhibitNullCharactersValidator
from rest_framework import serializers
from rest_framework.validators import ProhibitSurrogateCharactersValidator


class Base64Field(serializers.CharField):
    """A base64 string. DRF's CharField scans every character for NUL and surrogates in Python (7 ms for a 224 px
    JPEG, measured by bench/serving.py); base64 decoding with validate=True refuses those characters anyway."""

    def __init__(self, **kwargs):
        super().__init__(trim_whitespace=False, **kwargs)
        self.validators = [
            v
            for v in self.validators
            if not isinstance(v, (ProhibitNullCharactersValidator, ProhibitSurrogateCharactersValidator))
        ]


class Base64ImageSerializer(serializers.Serializer):
    data = Base64Field(help_text="The image file, base64-encoded (whitespace and line breaks are ignored).")
    media_type = serializers.ChoiceField(choices=["image/jpeg", "image/png", "image/webp"])


class RecognizeJsonSerializer(serializers.Serializer):
    images = Base64ImageSerializer(many=True, help_text="1 to 10 photos of one object.")


class TopKSerializer(serializers.Serializer):
    label = serializers.CharField()
    confidence = serializers.FloatField()


class HeadResultSerializer(serializers.Serializer):
    label = serializers.CharField(allow_null=True, help_text="null when confidence is below the head's threshold")
    confidence = serializers.FloatField()
    threshold = serializers.FloatField()
    reason = serializers.ChoiceField(
        choices=["low_confidence", "too_far", "ambiguous", "no_neighbours"],
        allow_null=True,
        help_text="why label is null (null when a label is given)",
    )
    top_k = TopKSerializer(many=True)


class NeighbourSerializer(serializers.Serializer):
    image_id = serializers.IntegerField()
    score = serializers.FloatField(help_text="cosine similarity, 1 = identical")
    labels = serializers.DictField(child=serializers.CharField(allow_null=True))
    thumbnail_url = serializers.CharField()


class RecognizeResponseSerializer(serializers.Serializer):
    model_version = serializers.IntegerField()
    runtime = serializers.CharField(
        help_text='what ran the model: "onnxruntime/CPUExecutionProvider", "onnxruntime/CUDAExecutionProvider", '
        '"torch/cpu", ... (LOUPE_SERVING_DEVICE)'
    )
    n_images = serializers.IntegerField()
    heads = serializers.DictField(child=HeadResultSerializer())
    neighbours = NeighbourSerializer(many=True)
    unclassifiable = serializers.BooleanField(help_text="true when no head gives a label")
    reason = serializers.CharField(allow_null=True, help_text='"reshoot" when unclassifiable: take new photos')
    mode = serializers.ChoiceField(choices=["softmax", "retrieval", "fusion"])
    combine = serializers.ChoiceField(
        choices=["mean", "vote", "geometric"], help_text="how the photos were combined (vote needs 3 or more)"
    )


class ErrorBodySerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    details = serializers.JSONField(allow_null=True)


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()


class ShelfJsonSerializer(serializers.Serializer):
    image = Base64ImageSerializer(help_text='The shelf photo (or "images": [one photo], as for /recognize).')


class ShelfBoxXywhSerializer(serializers.Serializer):
    x = serializers.FloatField(help_text="left, pixels of the uploaded photo (EXIF orientation applied)")
    y = serializers.FloatField(help_text="top, pixels")
    w = serializers.FloatField()
    h = serializers.FloatField()


class ShelfContainerSerializer(serializers.Serializer):
    label = serializers.CharField(help_text="the container class (bottle, can, glass, unknown_container, ...)")
    confidence = serializers.FloatField(help_text="the detector's score")


class ShelfSkuSerializer(serializers.Serializer):
    label = serializers.CharField(allow_null=True, help_text="null when rejected (see reason)")
    confidence = serializers.FloatField()
    reason = serializers.ChoiceField(
        choices=["low_confidence", "too_far", "ambiguous", "no_neighbours"],
        allow_null=True,
        help_text="why label is null, as for /recognize",
    )


class ShelfBoxSerializer(serializers.Serializer):
    box = ShelfBoxXywhSerializer()
    container = ShelfContainerSerializer()
    sku = ShelfSkuSerializer(allow_null=True, help_text="null when there is no SKU model (see note)")


class ShelfDetectorSerializer(serializers.Serializer):
    model_version = serializers.IntegerField()
    runtime = serializers.CharField()
    score_threshold = serializers.FloatField(help_text="boxes scored below it are not returned")


class ShelfSkuModelSerializer(serializers.Serializer):
    project = serializers.CharField(help_text="the SKU project's slug")
    model_version = serializers.IntegerField()
    runtime = serializers.CharField()
    head = serializers.CharField(help_text="the SKU project's head that names the SKU")
    mode = serializers.CharField(help_text="softmax, retrieval or fusion (?mode=)")


class ShelfImageSizeSerializer(serializers.Serializer):
    width = serializers.IntegerField()
    height = serializers.IntegerField()


class ShelfResponseSerializer(serializers.Serializer):
    detector = ShelfDetectorSerializer()
    sku_model = ShelfSkuModelSerializer(allow_null=True, help_text="null when boxes carry no SKU (see note)")
    note = serializers.CharField(allow_null=True, help_text="why boxes carry no SKU; null when they do")
    image = ShelfImageSizeSerializer()
    n_boxes = serializers.IntegerField()
    boxes = ShelfBoxSerializer(many=True)
    counts = serializers.DictField(child=serializers.IntegerField(), help_text="{SKU: boxes} over boxes with a SKU")
    unknown = serializers.IntegerField(help_text="boxes without a SKU (rejected, or no SKU model)")
    containers = serializers.DictField(child=serializers.IntegerField(), help_text="{container class: boxes}")
