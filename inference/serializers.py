from rest_framework import serializers


class Base64ImageSerializer(serializers.Serializer):
    data = serializers.CharField(help_text="The image file, base64-encoded.")
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
    n_images = serializers.IntegerField()
    heads = serializers.DictField(child=HeadResultSerializer())
    neighbours = NeighbourSerializer(many=True)
    unclassifiable = serializers.BooleanField(help_text="true when no head gives a label")
    reason = serializers.CharField(allow_null=True, help_text='"reshoot" when unclassifiable: take new photos')
    mode = serializers.ChoiceField(choices=["softmax", "retrieval", "fusion"])


class ErrorBodySerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    details = serializers.JSONField(allow_null=True)


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()
