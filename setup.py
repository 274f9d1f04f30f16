"""Package discovery for the design card's layout (metadata lives in pyproject.toml).

Three source roots install under one package: ``edgepeft/`` as ``edgepeft``, ``export/`` as
``edgepeft.export`` and ``runtimes/`` as ``edgepeft.runtimes``; ``devices/`` ships as the data
package ``edgepeft.devices``. Every folder under a root is found (namespace discovery, so a new
subpackage cannot be forgotten, with or without ``__init__.py``); tests/test_packaging.py builds
the wheel and checks that it holds every module of the checkout.
"""

from setuptools import find_namespace_packages, setup

ROOTS = {"edgepeft": "edgepeft", "edgepeft.export": "export", "edgepeft.runtimes": "runtimes",
         "edgepeft.devices": "devices"}

packages = []
for name, folder in ROOTS.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__*"])]

setup(package_dir=ROOTS, packages=packages)
