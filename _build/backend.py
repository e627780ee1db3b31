"""
setuptools, with editable installs in "compat" mode.

Twisted finds plugins by scanning sys.path for twisted/plugins directories.
setuptools' default editable install hides the project behind an import
hook that no path scan sees, so `twistd llmgate` would not exist after
`pip install -e .`; compat mode puts the project root on sys.path instead.
"""

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    settings = dict(config_settings or {})
    settings.setdefault("editable_mode", "compat")
    return _orig.build_editable(wheel_directory, settings, metadata_directory)
