"""Configuration: frozen dataclasses with every default in one place.

A stage's configuration is a root dataclass (`TrainJob`, `ExportJob`) whose fields are sections
(`model`, `data`, ...). Values come from, in order: the dataclass defaults, a TOML recipe, then
command-line overrides `--set section.key=value`. Unknown keys and values of the wrong type raise
`ValueError` naming the key. The resolved configuration is written next to every artifact with
`save_config`, and reads back with `load_config`.

Only the standard library is used here, so every stage (including the torch-free runtime) can
import it.
"""

from pgd_deploy.config.deploy_schema import ExportConfig, ExportJob, GatesConfig, ServeConfig
from pgd_deploy.config.loading import (
    add_override_argument,
    dumps_toml,
    from_dict,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from pgd_deploy.config.schema import (
    DataConfig,
    DistillConfig,
    ModelConfig,
    QatConfig,
    TrainConfig,
    TrainJob,
)

__all__ = [
    "DataConfig",
    "DistillConfig",
    "ExportConfig",
    "ExportJob",
    "GatesConfig",
    "ModelConfig",
    "QatConfig",
    "ServeConfig",
    "TrainConfig",
    "TrainJob",
    "add_override_argument",
    "dumps_toml",
    "from_dict",
    "load_config",
    "parse_overrides",
    "save_config",
    "to_dict",
]
