"""The recipes that ship with llrd: inside an installed wheel they are ``llrd/_recipes/`` (the repository's
``recipes/`` folder, mapped there by ``pyproject.toml``); in a checkout, ``recipes/`` beside ``llrd/``. Either
way the recipes find their ``common.py``, ``metrics/`` and ``accelerate/`` configs beside them.

Example:
    >>> default_script().endswith("text_classification.py")
    True
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # llrd/
SCRIPTS = ("text_classification.py", "image_classification.py")


def recipes_dir() -> Path:
    """The folder of the bundled recipes (installed: ``llrd/_recipes``; checkout: ``recipes``)."""
    for candidate in (PACKAGE / "_recipes", PACKAGE.parent / "recipes"):
        if (candidate / SCRIPTS[0]).is_file():
            return candidate
    raise ValueError(
        f"the bundled recipes are missing (looked in {PACKAGE / '_recipes'} and {PACKAGE.parent / 'recipes'}); "
        "reinstall llrd from its wheel, or pass --script with your own script"
    )


def default_script() -> str:
    """The bundled text-classification recipe, the sweep's default ``--script``."""
    return str(recipes_dir() / SCRIPTS[0])


def resolve_script(script: str | None) -> str:
    """``--script``: a file path as given (``~`` expanded), or the name of a bundled recipe
    (``text_classification``, ``image_classification.py``), or the default text recipe for None.

    Example:
        >>> Path(resolve_script("image_classification")).name
        'image_classification.py'
    """
    if script is None:
        return default_script()
    path = Path(script).expanduser()
    name = script if script.endswith(".py") else f"{script}.py"
    if not path.exists() and "/" not in script and name in SCRIPTS:
        return str(recipes_dir() / name)
    return str(path)


def resolve_config(config: str) -> str:
    """CONFIG as given, or the name of a bundled config (``minilm_sst2``) when no such file exists."""
    if Path(config).expanduser().exists():
        return str(Path(config).expanduser())
    for name in (config, f"{config}.yaml"):
        bundled = recipes_dir() / "configs" / name
        if "/" not in config and bundled.is_file():
            return str(bundled)
    return config


def expand_launcher(text: str) -> str:
    """``{recipes}`` in ``--launcher`` becomes the bundled recipes folder, e.g.
    ``accelerate launch --config_file {recipes}/accelerate/ddp_bf16.yaml``."""
    return text.replace("{recipes}", str(recipes_dir()))
