"""Every public name has a docstring: the API reference (docs/api/) is generated from them.

Public: the names of ``goose_jax.__all__``, every module of the public packages, and each
module's top-level functions and classes whose names do not start with ``_`` and that are defined
in that module (re-exports are checked where they are defined).
"""

import importlib
import inspect
import pkgutil

import goose_jax

PUBLIC_PACKAGES = ("core", "data", "models", "experts", "library", "routing", "evaluation",
                   "training", "interop", "pipeline")


def public_modules():
    """The importable public modules of the public packages, packages included."""
    names = []
    for package in PUBLIC_PACKAGES:
        root = importlib.import_module(f"goose_jax.{package}")
        names.append(root.__name__)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{root.__name__}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                names.append(info.name)
    return sorted(names)


def has_docstring(name, obj):
    """Whether `obj` carries a docstring written for it: not one Python makes up for a dataclass
    or a named tuple (``Name(field, ...)``), nor an enumeration's default."""
    doc = (obj.__doc__ or "").strip()
    if inspect.isclass(obj) and (doc.startswith(f"{name}(") or doc == "An enumeration."):
        return False
    return bool(doc)


def is_function_or_class(obj):
    """Functions and classes, and functions under a wrapper that keeps ``__wrapped__``
    (``jax.jit``, ``functools.wraps``)."""
    return (inspect.isfunction(obj) or inspect.isclass(obj)
            or (callable(obj) and inspect.isfunction(getattr(obj, "__wrapped__", None))))


def undocumented(module):
    """The public functions and classes defined in `module` that have no docstring."""
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or not is_function_or_class(obj):
            continue
        # Defined here, under this name (not an import, nor an alias such as GREEDY = _generate).
        if getattr(obj, "__module__", None) != module.__name__ or obj.__name__ != name:
            continue
        if not has_docstring(name, obj):
            missing.append(f"{module.__name__}.{name}")
    return missing


def test_package_all_is_documented():
    missing = [name for name in goose_jax.__all__
               if not has_docstring(name, getattr(goose_jax, name))]
    assert not missing, f"names of goose_jax.__all__ without a docstring: {missing}"


def test_every_public_module_and_name_is_documented():
    modules = public_modules()
    # The walk reaches the family sub-packages and the deepest modules.
    assert "goose_jax.models.t5.model" in modules and "goose_jax.routing.methods" in modules
    missing = []
    for name in modules:
        module = importlib.import_module(name)
        if not (module.__doc__ or "").strip():
            missing.append(name)
        missing.extend(undocumented(module))
    assert not missing, f"public modules and names without a docstring: {missing}"
