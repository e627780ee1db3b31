# -*- test-case-name: tests.test_packaging -*-
"""
The package list in setup.cfg names every package under llmgate/: a
regular (non-editable) install copies only the listed ones, so a package
missing there works in development and fails when installed.
"""

from __future__ import annotations

import configparser
import os

from twisted.trial.unittest import SynchronousTestCase

import llmgate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(llmgate.__file__)))


class PackageListTests(SynchronousTestCase):
    def test_every_package_is_listed(self) -> None:
        """Each folder of llmgate/ with an __init__.py is in [options] packages."""
        cfg = configparser.ConfigParser()
        cfg.read(os.path.join(ROOT, "setup.cfg"))
        listed = set(cfg["options"]["packages"].split())
        found = set()
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "llmgate")):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, ROOT)
                found.add(rel.replace(os.sep, "."))
        self.assertEqual(found - listed, set())
        self.assertIn("twisted.plugins", listed)
