from django import forms

from .models import Head, Project
from .presets import PRESET_CHOICES


class ProjectForm(forms.Form):
    name = forms.CharField(max_length=200)
    preset = forms.ChoiceField(choices=PRESET_CHOICES)
    heads = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 30, "placeholder": "make\nmodel < make\ncolor?"}),
        help_text="Own heads instead of the preset's, one per line: name, 'child < parent', 'name?' = optional.",
    )
    classes = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 40, "placeholder": "make: Toyota\nmodel: Corolla < Toyota"}),
        help_text="Classes to start with, one per line: 'head: class', for a child head 'head: class < parent'.",
    )


class ImportForm(forms.Form):
    MODES = [
        ("folder", "Folder: <class>/<ID>_<seq>.jpg"),
        ("csv", "CSV with column mapping"),
        ("placeholder", "Placeholder: all unlabeled"),
        ("export", "Export: car_labels.csv/labels.csv + images/ + splits.json, or an ImageFolder tree"),
    ]
    mode = forms.ChoiceField(choices=MODES)
    folder = forms.CharField(max_length=1000, help_text="A folder on the server, inside the import folders.")
    head = forms.ModelChoiceField(
        queryset=Head.objects.none(), required=False, help_text="Folder mode: the head the folder names label."
    )
    csv_path = forms.CharField(
        max_length=1000, required=False, label="CSV file", help_text="CSV mode: path of the CSV on the server."
    )
    filename_col = forms.CharField(max_length=100, required=False, initial="image_filename")
    head_map = forms.CharField(
        max_length=1000,
        required=False,
        label="Head columns",
        help_text="CSV mode: head=column pairs, comma-separated, e.g. make=make, model=model",
    )
    group_col = forms.CharField(max_length=100, required=False)
    group_by = forms.ChoiceField(
        choices=[
            ("auto", "auto: file names, unless they would swallow a class"),
            ("name", "file names (<ID>_<seq>.jpg: photos sharing an ID)"),
            ("image", "one group per photo"),
            ("column", "the CSV's group column"),
        ],
        initial="auto",
        required=False,
        label="Group by",
        help_text="Photos of one group never cross train/val/test splits.",
    )
    source_col = forms.CharField(max_length=100, required=False)
    skip_bad_rows = forms.BooleanField(required=False, help_text="Import the good rows and report the bad ones.")
    background = forms.BooleanField(
        required=False,
        label="In the background",
        help_text="Any size: a job on the worker writes the import in batches, with progress and cancel on the Jobs "
        "page; a failed or cancelled import removes what it wrote.",
    )
    update = forms.BooleanField(
        required=False,
        label="Update labels",
        help_text="For photos already in the project, set the labels the file gives (each change is recorded in "
        "the label history; an empty cell clears nothing). Unticked, their labels are kept.",
    )

    def __init__(self, *args, project, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["head"].queryset = project.heads.all()

    def clean_head_map(self) -> dict[str, str]:
        raw = self.cleaned_data.get("head_map") or ""
        out = {}
        for part in filter(None, (p.strip() for p in raw.split(","))):
            if "=" not in part:
                raise forms.ValidationError(f"{part!r} is not head=column.")
            head, col = (x.strip() for x in part.split("=", 1))
            out[head] = col
        return out

    def clean(self):
        data = super().clean()
        if data.get("mode") == "csv" and not (
            data.get("csv_path") and data.get("filename_col") and data.get("head_map")
        ):
            raise forms.ValidationError(
                "CSV mode needs the CSV file, the filename column and at least one head=column."
            )
        return data


class ReviewSettingsForm(forms.ModelForm):
    """The review queues' per-project settings (on the reviewer statistics page)."""

    class Meta:
        model = Project
        fields = ["uncertainty_strategy", "random_control_share", "double_review_share"]

    def clean(self):
        data = super().clean()
        for name in ("random_control_share", "double_review_share"):
            v = data.get(name)
            if v is not None and not 0.0 <= v <= 1.0:
                self.add_error(name, "A share between 0 and 1 (e.g. 0.1 for 10 %).")
        return data
