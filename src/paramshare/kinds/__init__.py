"""The built-in sharing kinds, one module each.

Every module in this package is imported when the registry is first used, and registers
its kind with :func:`paramshare.plans.register_kind`: adding a kind is adding a file here.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
