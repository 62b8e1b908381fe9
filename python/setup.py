"""Installs the package with the shared library beside it: the library named by
$MUSTAFAR_LIBRARY, else ../build/libmustafar.so (run `make lib` first)."""
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

NAME = {"win32": "mustafar.dll", "darwin": "libmustafar.dylib"}.get(sys.platform, "libmustafar.so")


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        src = os.environ.get("MUSTAFAR_LIBRARY") or os.path.join(here, "..", "build", NAME)
        dst = os.path.join(self.build_lib, "mustafar", NAME)
        if os.path.exists(src):
            shutil.copyfile(src, dst)
        elif not os.path.exists(os.path.join(here, "mustafar", NAME)):
            raise SystemExit("mustafar: %s not found: run `make lib` in the repository first, "
                             "or set MUSTAFAR_LIBRARY" % src)


setup(cmdclass={"build_py": BuildWithLibrary})
