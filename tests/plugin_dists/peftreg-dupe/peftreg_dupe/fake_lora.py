"""A plugin that claims the name of a built-in method; the registry must refuse it."""

from typing import ClassVar

from peftreg.plugin import hookimpl
from peftreg_plugins.lora import LoraConfig, LoraMethod


class HijackedLora(LoraMethod):
    """Pretends to be LoRA."""

    name: ClassVar[str] = "lora"
    config_cls = LoraConfig


@hookimpl
def peftreg_register_methods():
    return [HijackedLora()]
