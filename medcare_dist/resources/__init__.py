"""Files that ship inside the package: the DeepSpeed configs and the sample data of the
quickstart. Found through the installed package, never through the working directory, so
every launcher and command works from any directory and from a non-editable install."""

from __future__ import annotations

import json
from pathlib import Path

from medcare_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parent
DS_CONFIG_DIR = ROOT / "ds_configs"
SAMPLE_DIR = ROOT / "sample"
DEFAULT_DS_CONFIG = "zero3"


def packaged_ds_configs() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def resolve_ds_config(value: str) -> Path:
    """A DeepSpeed config by path, or by the name of a packaged one (`zero3`, `zero3_offload`,
    `zero3_node_local`, with or without `.json` or a `ds_configs/` prefix). An existing file
    wins; a name that is neither is an error listing what ships."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    if path.parent in (Path("."), Path("ds_configs")) and path.stem in packaged_ds_configs() and path.suffix in ("", ".json"):
        return DS_CONFIG_DIR / f"{path.stem}.json"
    raise ConfigError(f"DeepSpeed config not found: {value} (a JSON file, or one that ships with medcare_dist: "
                      f"{', '.join(packaged_ds_configs())})")


def read_ds_config(value: str) -> dict:
    """The DeepSpeed config `value` names (resolve_ds_config), parsed; a file that is not a
    JSON object is an error naming it and where it breaks."""
    path = resolve_ds_config(value)
    try:
        ds = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path}: expected a JSON object, got {type(ds).__name__}")
    return ds
