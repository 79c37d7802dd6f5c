"""gafh_fast: distributed, high-throughput training and inference for GAFH-RIDN face hallucination."""
__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """Make the source tree the same package as an installed copy.

    The Triton kernels live in the top-level kernels/ folder and install as gafh_fast/kernels (setup.py's
    package_dir). When gafh_fast is imported from the checkout instead (the current directory or
    PYTHONPATH comes before site-packages), this folder has no kernels/ subfolder, so `gafh_fast.kernels`
    is mapped to the sibling folder here. The finder goes first so that another installation's editable
    finder cannot hand this package someone else's kernels.
    """
    import importlib.abc
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(os.path.dirname(here), "kernels")
    if os.path.isdir(os.path.join(here, "kernels")) or not os.path.isfile(os.path.join(source, "__init__.py")):
        return  # an installed copy (it has its own gafh_fast/kernels), or a tree without the kernels

    class SourceKernelsFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != f"{__name__}.kernels":
                return None
            return importlib.util.spec_from_file_location(fullname, os.path.join(source, "__init__.py"),
                                                          submodule_search_locations=[source])

    if not any(type(f).__name__ == SourceKernelsFinder.__name__ for f in sys.meta_path):  # once, even on reload
        sys.meta_path.insert(0, SourceKernelsFinder())


_map_source_kernels()
