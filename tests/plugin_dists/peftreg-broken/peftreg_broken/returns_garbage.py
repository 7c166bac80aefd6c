"""A plugin whose hook returns something that is not a list of methods."""

from peftreg.plugin import hookimpl


@hookimpl
def peftreg_register_methods():
    return {"lora": "not a method"}
