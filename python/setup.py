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


cmdclass = {"build_py": BuildWithLibrary}
try:
    from setuptools.command.bdist_wheel import bdist_wheel      # setuptools >= 70.1
except ImportError:
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:                 # neither: a plain install, no wheel to tag
        bdist_wheel = None

if bdist_wheel is not None:
    class PlatformWheel(bdist_wheel):
        """The wheel carries a native library: tagged for this platform, any Python 3."""

        def finalize_options(self):
            super().finalize_options()
            self.root_is_pure = False

        def get_tag(self):
            return ("py3", "none") + tuple(super().get_tag()[2:])

    cmdclass["bdist_wheel"] = PlatformWheel

setup(cmdclass=cmdclass)
