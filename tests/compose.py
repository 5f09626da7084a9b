"""docker-compose.yml's application environment, with its defaults: what `docker compose up` gives the app."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
_VAR = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def app_environment(service: str = "web", **given: str) -> dict[str, str]:
    """The service's `environment`, ${VAR:-default} taken as the default unless VAR is `given`; a required
    ${VAR:?message} must be given."""

    def value(match: re.Match) -> str:
        name, kind, rest = match.groups()
        if name in given:
            return given[name]
        if kind == "-":
            return rest
        raise KeyError(f"docker-compose.yml needs {name} ({rest or 'no default'})")

    env = compose()["services"][service]["environment"]
    return {k: _VAR.sub(value, str(v)) for k, v in env.items()}
