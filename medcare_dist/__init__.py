"""medcare_dist: two-stage MedCare fine-tuning of Qwen chat models on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"


def package_version() -> str:
    """The installed package's version (its metadata), else, for a source tree on the path, __version__."""
    import importlib.metadata

    try:
        return importlib.metadata.version("medcare_dist")
    except importlib.metadata.PackageNotFoundError:
        return __version__
