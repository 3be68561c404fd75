"""Runs a kiqa command's real `main` in a fresh process, as a console script would.

Usage: python cli_driver.py MODULE [--small-backbone] -- ARGS...

`--small-backbone` swaps ConvNeXt for the tests' small CNN when `kiqa.train` is first
imported (after the command has set up its quiet console, so TF's first import goes
through kiqa's own path, as it does for users); everything else is the shipped code.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys


class _SmallBackbone(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "kiqa.train":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            from kiqa.model import small_cnn

            real = module.train
            module.train = lambda config, **kw: real(config, backbone=small_cnn((8, 16)), **kw)

        spec.loader.exec_module = patched
        return spec


def main():
    split = sys.argv.index("--")
    options, argv = sys.argv[1:split], sys.argv[split + 1:]
    if "--small-backbone" in options:
        sys.meta_path.insert(0, _SmallBackbone())
    module = importlib.import_module(options[0])
    sys.argv = [options[0], *argv]
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
